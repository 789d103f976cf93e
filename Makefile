# kv.c — the KV application of Elixir's "Mix and OTP" guide, in one C file.
#
#   make          build ./kv and ./kv_test
#   make test     build and run the self-test (the guide's tests and more)
#   make run      run ./kv
#   make bench    run ./kv bench: the runtime's speed and memory figures
#   make clean    remove what make built
#   make check-comments  every public (API) function in kv.c has a comment
#                 right above it, saying which Elixir call it mirrors
#                 (part of make test)
#
# CC, CFLAGS and LDFLAGS are yours to set: `make test CC=clang CFLAGS=-O0`.
# CFLAGS only chooses optimisation and warnings; what the code needs to
# compile (the language standard) is in KV_CFLAGS, and the feature-test
# macros are in kv.c itself.

CC ?= cc
CFLAGS ?= -O2 -Wall -Wextra
KV_CFLAGS = -std=c99

all: kv kv_test

kv: kv.c
	$(CC) $(KV_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ kv.c

kv_test: kv_test.c kv.c
	$(CC) $(KV_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ kv_test.c

test: check-comments kv_test
	./kv_test

# An API line that is not a prototype must follow a line ending in */.
check-comments:
	@awk '/^API / && !/\);/ && prev !~ /\*\/[ \t]*$$/ { \
	        printf "%s:%d: no comment above this public function: %s\n", FILENAME, NR, $$0; bad = 1 } \
	     NF { prev = $$0 } END { exit bad }' kv.c

run: kv
	./kv

bench: kv
	./kv bench

clean:
	rm -f kv kv_test

.PHONY: all test run bench clean check-comments
