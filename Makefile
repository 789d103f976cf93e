# kv.c — the KV application of Elixir's "Mix and OTP" guide, in one C file.
#
#   make          build ./kv and ./kv_test
#   make test     build and run the self-test (the guide's tests and more)
#   make run      run ./kv
#   make bench    run ./kv bench: the runtime's speed and memory figures
#   make clean    remove what make built
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

test: kv_test
	./kv_test

run: kv
	./kv

bench: kv
	./kv bench

clean:
	rm -f kv kv_test

.PHONY: all test run bench clean
