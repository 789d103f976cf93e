# kv.c — the KV application of Elixir's "Mix and OTP" guide, in one C file.
#
#   make          build ./kv and ./kv_test
#   make run      play every chapter's iex sessions, each with its own stage
#   make test     everything below, then the self-test: 5 stages, the steps
#                 between them, the guide's failing runs, the comments
#   make shell    run ./kv shell: the guide's text protocol, and Observer in text
#   make bench    run ./kv bench: the runtime's speed and memory figures
#   make compare  the same figures beside BEAM's (bench/compare.sh; needs
#                 Erlang and Elixir, as make check's inspect-diff does;
#                 nothing else here needs them)
#   make chapters regenerate chapters/ from kv.c and kv_test.c
#   make diffs    write diffs/N-CHAPTER.diff, each stage against the one before
#   make flaws    run the guide's failing runs (tools/flaws), each as the guide shows it
#   make check    the proof that it holds up (tools/check.sh): gcc and clang at
#                 -O0, -O2 and -O3, -pedantic, hardening, sanitizers, valgrind, i386,
#                 musl, aarch64, the chaos test at full count, fuzzing, inspect
#                 beside Elixir's; each skipped, with a line, if its tool is
#                 missing.  `make check CHECK="valgrind chaos"` runs some.
#   make clean    remove what make built
#
# The parts of make test, which can be run alone:
#   make check-comments  every public (API) function in kv.c has a comment
#                        right above it (the one that says which Elixir call
#                        it mirrors)
#   make check-chapters  chapters/ is what `make chapters` makes, byte for byte
#   make stage/1-agents, step/genservers, flaw/crash: one stage, step or flaw
#
# CC, CFLAGS and LDFLAGS are yours to set: `make test CC=clang CFLAGS=-O0`.
# CFLAGS only chooses optimisation and warnings; what the code needs to
# compile (the language standard) is in KV_CFLAGS, and the feature-test
# macros are in kv.c itself.  The stages, steps and flaws are built with
# CHAPTER_CFLAGS (at -O0, so that make test stays quick), JOBS at a time.

CC ?= cc
CFLAGS ?= -O2 -Wall -Wextra
KV_CFLAGS = -std=c99
CHAPTER_CFLAGS = -O0 -Wall -Wextra -Werror
JOBS = $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

STAGES := $(shell sh tools/chapters.sh stages | cut -d' ' -f1)
STEPS := $(shell sh tools/chapters.sh steps)
FLAWS := $(shell sh tools/chapters.sh flaws)
TEST_PARTS = check-comments check-chapters $(STAGES:%=stage/%) $(STEPS:%=step/%) $(FLAWS:%=flaw/%)

all: kv kv_test

kv: kv.c
	$(CC) $(KV_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ kv.c

kv_test: kv_test.c kv.c
	$(CC) $(KV_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ kv_test.c

# The checks run side by side with the build of ./kv_test; the self-test
# runs last, so that its closing line ("N tests, M failures") ends the run.
test:
	@$(MAKE) -s -j$(JOBS) --no-print-directory kv_test $(TEST_PARTS)
	./kv_test

# An API line that is not a prototype (one that ends in ");") must follow
# a comment: a line ending in */, or a // line in retired code (a //> STEP
# marker is no comment).  In kv.c and in every stage.
check-comments:
	@awk 'FNR == 1 { prev = "" } \
	     /^API / && !/\);[ \t]*$$/ && prev !~ /\*\/[ \t]*$$/ && (prev !~ /^[ \t]*\/\// || prev ~ /^\/\/> /) { \
	        printf "%s:%d: no comment above this public function: %s\n", FILENAME, FNR, $$0; bad = 1 } \
	     NF { prev = $$0 } END { exit bad }' kv.c chapters/*/kv.c
	@echo "check-comments: every public function in kv.c and chapters/ has its comment"

check-chapters:
	@sh tools/chapters.sh check

stage/%:
	@CC="$(CC)" CFLAGS="$(CHAPTER_CFLAGS)" sh tools/chapters.sh stage $*

step/%:
	@CC="$(CC)" CFLAGS="$(CHAPTER_CFLAGS)" sh tools/chapters.sh step $*

flaw/%:
	@mkdir -p build
	@CC="$(CC)" CFLAGS="$(CHAPTER_CFLAGS)" sh tools/chapters.sh flaw $* >build/flaw-$(subst /,_,$*).out 2>&1 || \
	    { cat build/flaw-$(subst /,_,$*).out; exit 1; }
	@tail -n 1 build/flaw-$(subst /,_,$*).out

chapters:
	sh tools/chapters.sh write

diffs:
	sh tools/chapters.sh diffs

check:
	@sh tools/check.sh $(CHECK)

flaws:
	@for f in $(FLAWS); do CC="$(CC)" CFLAGS="$(CHAPTER_CFLAGS)" sh tools/chapters.sh flaw $$f || exit 1; echo; done

# Every chapter's sessions, in the guide's order, each run by its own
# stage's ./kv (the last of them is the top-level ./kv).
run:
	@for s in $(STAGES); do \
	    echo "==== chapters/$$s: ./kv"; \
	    $(MAKE) -s --no-print-directory -C chapters/$$s CC="$(CC)" CFLAGS="$(CFLAGS)" kv || exit 1; \
	    (cd chapters/$$s && ./kv) || exit 1; echo; \
	done

shell: kv
	./kv shell

bench: kv
	./kv bench

compare:
	sh bench/compare.sh

clean:
	rm -rf kv kv_test build diffs
	for s in $(STAGES); do rm -f chapters/$$s/kv chapters/$$s/kv_test; done

.PHONY: all test run shell bench compare check clean chapters diffs flaws check-comments check-chapters
