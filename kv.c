/*
 * kv.c — the KV application of Elixir's "Mix and OTP" guide, rebuilt in C.
 *
 *     cc -std=c99 -O2 -Wall -Wextra -o kv kv.c      (or simply: make run)
 *
 * Read this file beside the guide.  The guide builds a key-value store in
 * Elixir: buckets (an Agent), a registry of buckets (a GenServer that
 * monitors them), a supervisor, a dynamic supervisor for the buckets and an
 * application callback that starts the whole tree.  Elixir gets values,
 * processes, mailboxes, links, monitors and exit signals for free from the
 * BEAM virtual machine.  C gets none of that, so this file builds them too,
 * small and in plain sight, each in the first chapter that needs it, and
 * follows the guide chapter by chapter, section by section.
 *
 *   Part I     Terms: the values everything is made of, and their printing
 *   Part II    introduction-to-mix.md        the project Mix generates
 *   Part III   Processes: the runtime the guide takes for granted        //> agents
 *   Part IV    OTP's generic server, which Agent and GenServer run on    //> agents
 *   Part V     agents.md                     Agent and KV.Bucket         //> agents
 *   Part VI    genservers.md                 KV.Registry, monitors       //> genservers
 *   Part VII   supervisor-and-application.md Supervisor, Application     //> supervisor-and-application
 *   Part VIII  dynamic-supervisor.md         DynamicSupervisor, the tree //> dynamic-supervisor
 *   Part IX    ./kv: the program (the modules loaded, the sessions replayed)
 *
 * Every banner names the guide chapter and section it mirrors, and a Part
 * uses only the Parts before it.  Every public function says, in its first
 * comment line, which Elixir call it mirrors.  Names follow Elixir:
 * GenServer.call is gen_server_call, KV.Bucket.put is kv_bucket_put,
 * Process.monitor is process_monitor; the kv_ prefix is kept for the KV
 * modules.  Kernel's auto-imported functions keep their bare names (self,
 * spawn, spawn_link, make_ref) except where the C library owns the name
 * already: Kernel.exit/1 is exit_self and Kernel.send/2 is process_send.
 * Terms are built with functions named after what they build: tuple(2,
 * am_ok, pid) is {:ok, pid}, list(...), map(...), atom("ok"), string("milk").
 *
 * Words from the guide and the BEAM are used in their Erlang sense: a
 * "process" is one of ours (a coroutine), never an operating-system process;
 * the program itself is "the VM".
 *
 * The chapters.  The top-level kv.c is the guide's last stage, and
 * chapters/ holds this file as it stood at the end of each chapter, each
 * stage with its own tests, so that a chapter can be compiled and read on
 * its own.  The stages are cut from the top-level file by tools/cut.awk
 * (make chapters), which follows light markers there naming the step of
 * the guide (tools/steps) where code arrives; a stage leaves them out:
 *
 *     //> genservers          on a line of its own, above a banner or a
 *                             function: what follows arrives in genservers.md
 *     code;  //> genservers   at the end of a line: that line does
 *     a comment that opens    code that a later section of the guide
 *     with "retired at STEP:" replaced, kept where the guide first wrote it:
 *                             commented out in the top-level file, live in
 *                             the stages before STEP
 *
 * Everything before the first marker arrives with the first chapter.
 */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI: _setjmp, sigaltstack */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h> //> dynamic-supervisor/supervision-trees
#include <time.h>
#include <unistd.h>

/* API marks the functions that mirror an Elixir call.  They are static
 * like everything in this one-file program, and may go unused by ./kv
 * (the self-test, which includes this file, uses them). */
#if defined(__GNUC__) || defined(__clang__)
#define NOINLINE __attribute__((noinline))
#define NORETURN __attribute__((noreturn))
#define PRINTF(f, a) __attribute__((format(printf, f, a)))
#define API static __attribute__((unused))
#else
#define NOINLINE
#define NORETURN
#define PRINTF(f, a)
#define API static
#endif

/* KV_ASAN: built with -fsanitize=address (III.3 says what changes then). */
#if defined(__SANITIZE_ADDRESS__)
#define KV_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KV_ASAN 1
#endif
#endif

/* ==========================================================================
 * PART I — TERMS: THE VALUES EVERYTHING IS MADE OF
 * ==========================================================================
 *
 * I.1  Terms in pictures
 * ----------------------
 *
 * Every value an Elixir program touches is a term: an integer, an atom, a
 * string, a tuple, a list, a map, a pid, a reference, a function.  Terms
 * never change once built; "changing" one builds a new one.  In kv.c a term
 * is a pointer to a small struct in memory, and the pointer is all that
 * is ever passed around:
 *
 *     {:ok, "milk"}
 *
 *     +-------+-----+---------+---------+
 *     | TUPLE | n=2 | item[0] | item[1] |       struct term: a kind, a
 *     +-------+-----+----|----+----|----+       count, and what follows
 *                        |         |
 *                        |         +--> +-----+-----+-----------+
 *                        |              | BIN | n=4 | m i l k \0|
 *                        v              +-----+-----+-----------+
 *     the atom :ok, interned: one struct for every :ok in the VM
 *
 *     [1, 2] is two list cells ending in [], the one shared empty list:
 *
 *     +------+------+------+      +------+------+------+
 *     | CONS | head | tail-+----> | CONS | head | tail-+----> []
 *     +------+--|---+------+      +------+--|---+------+
 *               v                           v
 *               1                           2
 *
 * Where terms live.  Terms are allocated from a heap: a chain of memory
 * chunks in which a new term takes the next free bytes (a pointer bump).
 * Nothing in a heap is freed on its own; the heap is freed whole, when
 * what owns it is done.  From agents.md on, every process has a heap of its
 * own, and a term that passes from one process to another is copied into
 * the receiver's heap, so no term is ever shared between two heaps; only
 * atoms, which never go away, are shared by everyone.
 *
 * What is in this Part: where the memory comes from (I.2), the term
 * struct, heaps, atoms and the functions that build and look at terms
 * (I.3), Erlang's ordering of terms, maps, and copying (I.4), and printing
 * terms exactly as iex does (I.5).  Inspect is long, and a first reading
 * may skip it: what it prints is all the rest of the file relies on.
 */

/* --------------------------------------------------------------------------
 * I.2  Memory: every byte counted
 * --------------------------------------------------------------------------
 * Two allocators count every byte.  What the program's terms live in
 * (heap chunks) comes from mem_alloc and goes back through mem_free with
 * its size, so vm_memory() says exactly how many bytes they hold.
 * From Part III on, everything a process owns (its struct proc, heap       //> agents
 * chunks, messages, saved stack, links and monitors) is counted so, and    //> agents
 * the self-test uses it to prove that a dead process leaves nothing        //> agents
 * behind.                                                                  //> agents
 *
 * Everything else, the VM's own (atoms, pooled chunks, text being printed,
 * a walk's stack; later the process table, the timer heap, names), comes from
 * vm_alloc, vm_realloc and vm_free, which count it too: each block carries
 * its size in a small header, so vm_memory_system() knows the total.  No
 * allocation in kv.c escapes both counts, so the self-test can show that
 * memory comes back whichever allocator it came from.  (The names follow
 * :erlang.memory/1, whose :processes and :system split is the same.)
 * Running out of memory stops the program with a message.
 */

static size_t mem_in_use; /* the processes' bytes */
static size_t vm_in_use;  /* the VM's own */

static NORETURN void out_of_memory(size_t size) {
    fprintf(stderr, "kv: out of memory (asked for %zu bytes)\n", size);
    abort();
}

/* The header in front of each vm_alloc'd block: its size, in a union that
 * keeps the block after it aligned for any C type. */
typedef union {
    size_t size;
    long double align_ld;
    void *align_p;
    long long align_ll;
} vm_header;

static void *vm_realloc(void *old, size_t size) {
    vm_header *h = old ? (vm_header *)old - 1 : NULL;
    size_t old_size = h ? h->size : 0;
    h = realloc(h, sizeof *h + size);
    if (!h) out_of_memory(size);
    vm_in_use = vm_in_use - old_size + size;
    h->size = size;
    return h + 1;
}

static void *vm_alloc(size_t size) { return vm_realloc(NULL, size); }

static void vm_free(void *p) {
    if (!p) return;
    vm_header *h = (vm_header *)p - 1;
    vm_in_use -= h->size;
    free(h);
}

static void *mem_alloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p) out_of_memory(size);
    mem_in_use += size;
    return p;
}

//> agents
static void *mem_realloc(void *old, size_t old_size, size_t size) {
    void *p = realloc(old, size ? size : 1);
    if (!p) out_of_memory(size);
    mem_in_use = mem_in_use - old_size + size;
    return p;
}
//> introduction-to-mix

static void mem_free(void *p, size_t size) {
    if (!p) return;
    mem_in_use -= size;
    free(p);
}

/* :erlang.memory(:processes) — the bytes the processes hold right now */
API size_t vm_memory(void) { return mem_in_use; }

/* :erlang.memory(:system) — the bytes the VM holds for itself */
API size_t vm_memory_system(void) { return vm_in_use; }

/* A growable string, used to build everything that gets printed. */
struct buf {
    char *s;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1) cap *= 2;
    b->s = vm_realloc(b->s, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void buf_puts(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* Formatted into a small buffer on the C stack first; only a longer text
 * is formatted a second time, straight into the reserved space. */
static PRINTF(2, 3) void buf_printf(struct buf *b, const char *fmt, ...) {
    char small[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) {
        buf_add(b, small, (size_t)n);
        return;
    }
    buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static const char *buf_str(struct buf *b) { return b->s ? b->s : ""; }

static void buf_free(struct buf *b) {
    vm_free(b->s);
    b->s = NULL;
    b->len = b->cap = 0;
}

/* --------------------------------------------------------------------------
 * I.3  Terms
 * --------------------------------------------------------------------------
 * A term is a pointer to an immutable struct term.  Its `kind` says what it
 * is; the kinds are listed in Erlang's term order (a number is smaller than
 * an atom, an atom smaller than a reference, ..., a list smaller than a
 * binary), so comparing two terms of different kinds is comparing kinds.
 *
 *     struct term:  kind | n | u (8 bytes) | item[] ...
 *
 *     integer    n unused         u.i = the value
 *     atom       n = name length  u.i = hash      item[] = the name's bytes
 *     reference  n unused         u.id = N, printed #Reference<0.0.0.N>
 *     function   n = env size     u.fun = C code  item[0] = captured term
 *     pid        n unused         u.id = N, printed #PID<0.N.0>
 *     tuple      n = arity        item[0..n-1]
 *     map        n = size         item[0..n-1] keys (sorted), item[n..2n-1]
 *     []         the one empty list, a static constant
 *     list cell  n unused         item[0] = head, item[1] = tail
 *     binary     n = byte length  item[] = the bytes (a string)
 *
 * Atoms are interned in a global table and never freed, as on BEAM (the
 * guide warns against turning user input into atoms for exactly that
 * reason), so two atoms are equal exactly when the pointers are equal.
 * Every other term lives in the heap of the process that built it.
 */

enum kind {
    K_INT, K_ATOM, K_REF, K_FUN, K_PID, K_TUPLE, K_MAP, K_NIL, K_CONS, K_BIN,
    K_MAPNODE /* not a value: a node inside a large map (I.4) */
};

typedef const struct term *term;

struct fun_def; /* a C function that a fun term calls; see below */

struct term {
    uint8_t kind;
    uint32_t n;
    union {
        int64_t i;
        uint64_t id;
        const struct fun_def *fun;
    } u;
    term item[];
};

#define BYTES(t) ((const char *)(t)->item)

/* A fun: Elixir's anonymous function, as a C function plus one captured
 * term.  `fn list -> ["eggs" | list] end` is a fun_def whose code conses
 * "eggs" onto its argument; `&Map.get(&1, key)` captures `key` as env. */
struct fun_def {
    const char *name;       /* the C function, for printing */
    int arity;              /* 0 or 1 */
    const char *defined_in; /* "KV.Bucket.get/2", as Elixir prints it */
    term (*code)(term env, term arg);
};

/* The empty list is one static term, like Erlang's NIL. */
static const struct term nil_term = {.kind = K_NIL};
#define NIL (&nil_term)

/* ---- Heaps -------------------------------------------------------------
 * A heap is a chain of chunks.  Allocation bumps a pointer in the newest
 * chunk; nothing is freed one by one.  A message is built in a chunk of its
 * own, sized exactly, and that chunk joins the receiver's heap when the
 * message is received:
 *
 *     P's heap:  chunks -> [chunk 3: 256 B, used 80] -> [chunk 2] -> [chunk 1]
 *                             ^ new terms go here (a pointer bump)
 *
 *     a message to P:  [chunk: struct msg | {:hello, "world"} copied]
 *     P receives it:   chunks -> [chunk 3] -> [that chunk] -> [chunk 2] ...
 *
 * The message's chunk goes in behind the one being allocated from: it is
 * full, and in front it would make the next allocation open a new chunk
 * (and a process that receives many messages would open one per message).
 *
 * So a term stays where it was built until the whole heap goes, when the
 * process dies (heap_free) or when it is compacted around the one term it
 * still needs (heap_compact).
 * (III.7 compacts; GenServer does it between callbacks.)     //> agents
 * Nothing ever points from one process's heap into another's, because
 * every term that crosses is copied. */

struct chunk {
    struct chunk *next;
    size_t size, used; /* bytes of data[] */
    uint64_t data[]; /* 8-byte aligned, as every term is */
};

struct heap {
    struct chunk *chunks; /* newest first */
    size_t bytes;         /* memory its chunks take, headers included */
    size_t live;          /* bytes kept by the last compaction */
    struct chunk *old;    /* the chunk the last compaction copied into */
    term old_root;        /* ...and the root it kept there (III.7) */
};

#define ALIGN8(n) (((n) + 7) & ~(size_t)7)

/* Chunks come and go with every message, so small ones are recycled: a
 * freed chunk of 64, 128, ... or 4096 bytes waits in a pool for the next
 * request of its size instead of going back to malloc.  A request is
 * rounded up to the next of those sizes.  Pooled chunks belong to no
 * process, so vm_memory() does not count them. */
#define POOL_CLASSES 7        /* 64 << 0 ... 64 << 6 = 4096 bytes */
#define POOL_MAX_PER_CLASS 1024

static struct {
    struct chunk *free[POOL_CLASSES];
    size_t n[POOL_CLASSES];
} pool;

static int pool_class(size_t size) {
    for (int c = 0; c < POOL_CLASSES; c++)
        if (size <= (size_t)64 << c) return c;
    return -1;
}

static struct chunk *chunk_new(size_t size) {
    int cls = pool_class(size);
    struct chunk *c;
    if (cls >= 0) size = (size_t)64 << cls;
    if (cls >= 0 && pool.free[cls]) {
        c = pool.free[cls];
        pool.free[cls] = c->next;
        pool.n[cls]--;
        vm_in_use -= sizeof *c + size; /* the pool's, then a process's */
        mem_in_use += sizeof *c + size;
    } else {
        c = mem_alloc(sizeof *c + size);
        c->size = size;
    }
    c->next = NULL;
    c->used = 0;
    return c;
}

static void chunk_free(struct chunk *c) {
    int cls = pool_class(c->size);
    if (cls >= 0 && c->size == (size_t)64 << cls && pool.n[cls] < POOL_MAX_PER_CLASS) {
        mem_in_use -= sizeof *c + c->size;
        vm_in_use += sizeof *c + c->size;
        c->next = pool.free[cls];
        pool.free[cls] = c;
        pool.n[cls]++;
        return;
    }
    mem_free(c, sizeof *c + c->size);
}

/* Give every pooled chunk back to malloc (at exit, and for the self-test,
 * which counts malloc's own bytes). */
static void pool_drain(void) {
    for (int c = 0; c < POOL_CLASSES; c++) {
        for (struct chunk *ch = pool.free[c], *next; ch; ch = next) {
            next = ch->next;
            vm_in_use -= sizeof *ch + ch->size;
            free(ch); /* a process's once (mem_alloc), the pool's now */
        }
        pool.free[c] = NULL;
        pool.n[c] = 0;
    }
}

static void heap_add_chunk(struct heap *h, struct chunk *c) {
    c->next = h->chunks;
    h->chunks = c;
    h->bytes += sizeof *c + c->size;
}

//> agents
/* A full chunk from elsewhere (a received message's) joins h behind the
 * chunk that allocation goes on in; in front of the chunk a compaction
 * left (h->old), though, which only ever holds what it kept (III.7). */
static void heap_adopt_chunk(struct heap *h, struct chunk *c) {
    if (!h->chunks || h->chunks == h->old) {
        heap_add_chunk(h, c);
        return;
    }
    c->next = h->chunks->next;
    h->chunks->next = c;
    h->bytes += sizeof *c + c->size;
}
//> introduction-to-mix

static void *heap_alloc(struct heap *h, size_t size) {
    size = ALIGN8(size);
    struct chunk *c = h->chunks;
    if (!c || c->size - c->used < size) {
        /* Chunks grow with the heap: 256 bytes at first, at most 64 KiB.
         * What the last compaction kept does not count: a server whose
         * state is large still makes small garbage between compactions. */
        size_t want = (h->bytes - h->live) / 2;
        if (want < 256) want = 256;
        if (want > 65536) want = 65536;
        if (want < size) want = size;
        c = chunk_new(want);
        heap_add_chunk(h, c);
    }
    void *p = (char *)c->data + c->used;
    c->used += size;
    return p;
}

static void heap_free(struct heap *h) {
    struct chunk *c = h->chunks;
    while (c) {
        struct chunk *next = c->next;
        chunk_free(c);
        c = next;
    }
    h->chunks = NULL;
    h->bytes = 0;
    h->live = 0;
    h->old = NULL;
    h->old_root = NULL;
}

/* Where new terms go.  Normally the running process's heap; the VM points
 * it elsewhere for a moment when it builds a message on behalf of nobody
 * (an exit signal from a dead process, say), with WITH_HEAP. */
static struct heap *alloc_heap;
static struct heap outside_heap; /* terms built when no process runs */

/* Run `code` with new terms going to heap h, then put things back. */
#define WITH_HEAP(h, code)                 \
    do {                                   \
        struct heap *saved_ = alloc_heap;  \
        alloc_heap = (h);                  \
        code;                              \
        alloc_heap = saved_;               \
    } while (0)

/* The bytes a term with `items` items takes in a heap, rounded up as
 * heap_alloc rounds every request.  term_size, which measures a term
 * before it is copied, counts with this same function, so a copy always
 * fits the chunk measured for it, on 32-bit machines too (where a pointer
 * is 4 bytes and an odd item count would otherwise leave the two sums 4
 * bytes apart). */
static size_t term_bytes(size_t items) { return ALIGN8(sizeof(struct term) + items * sizeof(term)); }

static struct term *term_alloc(enum kind kind, uint32_t n, size_t items) {
    struct term *t = heap_alloc(alloc_heap, term_bytes(items));
    t->kind = (uint8_t)kind;
    t->n = n;
    t->u.i = 0;
    return t;
}

/* ---- Atoms ------------------------------------------------------------ */

static struct {
    term *slots;
    size_t cap, count;
} atoms;

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211u;
    return h;
}

static void atoms_grow(void) {
    size_t cap = atoms.cap ? atoms.cap * 2 : 256;
    term *slots = vm_alloc(cap * sizeof *slots);
    memset(slots, 0, cap * sizeof *slots);
    for (size_t i = 0; i < atoms.cap; i++) {
        term a = atoms.slots[i];
        if (!a) continue;
        size_t j = (size_t)a->u.id & (cap - 1);
        while (slots[j]) j = (j + 1) & (cap - 1);
        slots[j] = a;
    }
    vm_free(atoms.slots);
    atoms.slots = slots;
    atoms.cap = cap;
}

/* :name — the atom with this name, created on first use. */
static term atom_n(const char *name, size_t n) {
    if (atoms.count * 2 >= atoms.cap) atoms_grow();
    uint64_t h = hash_bytes(name, n);
    size_t j = (size_t)h & (atoms.cap - 1);
    for (term a; (a = atoms.slots[j]); j = (j + 1) & (atoms.cap - 1))
        if (a->n == n && memcmp(BYTES(a), name, n) == 0) return a;
    /* Atoms live outside every heap, in plain malloc memory, forever. */
    struct term *a = vm_alloc(sizeof *a + n + 1);
    memset(a, 0, sizeof *a + n + 1);
    a->kind = K_ATOM;
    a->n = (uint32_t)n;
    a->u.id = h;
    memcpy((char *)a->item, name, n);
    atoms.slots[j] = a;
    atoms.count++;
    return a;
}

/* :name — the atom with this name */
API term atom(const char *name) { return atom_n(name, strlen(name)); }

/* The atoms the VM uses itself are created once, at start-up, and kept in
 * variables: am_ok is :ok.  (BEAM's own C source names its built-in atoms
 * the same way.)  Each Part declares its own list, ATOMS(X) style, and
 * creates them in its init function: DECLARE_ATOMS(list) declares the
 * variables, INIT_ATOMS(list) fills them in.  Module names are atoms too:
 * KV.Registry is :"Elixir.KV.Registry". */
#define DECLARE_ATOM(id, text) static term am_##id;
#define INIT_ATOM(id, text) am_##id = atom(text);
#define DECLARE_ATOMS(list) list(DECLARE_ATOM)
#define INIT_ATOMS(list) list(INIT_ATOM)

/* Part I's: the ones the printing of terms needs. */
#define TERM_ATOMS(X) X(nil, "nil") X(true, "true") X(false, "false") X(struct_, "__struct__") \
    X(exception_, "__exception__")
DECLARE_ATOMS(TERM_ATOMS)

/* KV.Registry — the atom :"Elixir.KV.Registry", an alias */
API term alias(const char *name) {
    char buf[256];
    snprintf(buf, sizeof buf, "Elixir.%s", name);
    return atom(buf);
}

/* ---- Building terms ---------------------------------------------------
 * One function per kind of Elixir literal, named after what it builds.
 * They are the file's vocabulary, so, like the API, a stage may leave some
 * unused. */

/* 42 — an integer */
API term integer(int64_t i) {
    struct term *t = term_alloc(K_INT, 0, 0);
    t->u.i = i;
    return t;
}

/* <<bytes>> — a binary of n bytes */
API term binary(const char *bytes, size_t n) {
    /* The bytes follow the header, plus a NUL so BYTES(b) is a C string. */
    struct term *b = heap_alloc(alloc_heap, sizeof *b + n + 1);
    b->kind = K_BIN;
    b->n = (uint32_t)n;
    b->u.i = 0;
    memcpy((char *)b->item, bytes, n);
    ((char *)b->item)[n] = '\0';
    return b;
}

/* "milk" — an Elixir string (a UTF-8 binary) */
API term string(const char *s) { return binary(s, strlen(s)); }

/* #PID<0.n.0> — the pid of process number n (processes arrive in Part III) */
API term pid_term(uint64_t n) {
    struct term *t = term_alloc(K_PID, 0, 0);
    t->u.id = n;
    return t;
}

/* #Reference<0.0.0.n> — reference number n */
API term ref_term(uint64_t n) {
    struct term *t = term_alloc(K_REF, 0, 0);
    t->u.id = n;
    return t;
}

/* {items[0], ..., items[n-1]} — a tuple of any size */
API term tuple_of(size_t n, const term *items) {
    struct term *t = term_alloc(K_TUPLE, (uint32_t)n, n);
    for (size_t i = 0; i < n; i++) t->item[i] = items[i];
    return t;
}

/* {a, b, ...} — tuple(3, am_ok, x, y) builds {:ok, x, y} */
API term tuple(size_t n, ...) {
    term items[16];
    if (n > 16) abort(); /* use tuple_of for more */
    va_list ap;
    va_start(ap, n);
    for (size_t i = 0; i < n && i < 16; i++) items[i] = va_arg(ap, term);
    va_end(ap);
    return tuple_of(n, items);
}

/* [head | tail] */
API term cons(term head, term tail) {
    struct term *t = term_alloc(K_CONS, 0, 2);
    t->item[0] = head;
    t->item[1] = tail;
    return t;
}

/* [items[0], ..., items[n-1]] — a list of any length */
API term list_of(size_t n, const term *items) {
    term l = NIL;
    while (n--) l = cons(items[n], l);
    return l;
}

/* [a, b, ...] — a list literal */
API term list(size_t n, ...) {
    term items[16];
    if (n > 16) abort(); /* use list_of for more */
    va_list ap;
    va_start(ap, n);
    for (size_t i = 0; i < n && i < 16; i++) items[i] = va_arg(ap, term);
    va_end(ap);
    return list_of(n, items);
}

/* fn ... end — a fun: def's C code, with env as the term it captured */
API term fun_term(const struct fun_def *def, term env) {
    struct term *t = term_alloc(K_FUN, 1, 1);
    t->u.fun = def;
    t->item[0] = env ? env : NIL;
    return t;
}

/* true or false, the atoms, from a C bool (C's side only; Elixir needs none) */
API term boolean(bool b) { return b ? am_true : am_false; }

/* ---- Looking at terms -------------------------------------------------
 * Kernel's guards and accessors, with their Elixir names. */

/* is_integer/1 */
API bool is_integer(term t) { return t->kind == K_INT; }
/* is_atom/1 */
API bool is_atom(term t) { return t->kind == K_ATOM; }
/* is_pid/1 */
API bool is_pid(term t) { return t->kind == K_PID; }
/* is_reference/1 */
API bool is_reference(term t) { return t->kind == K_REF; }
/* is_tuple/1 */
API bool is_tuple(term t) { return t->kind == K_TUPLE; }
/* is_map/1 */
API bool is_map(term t) { return t->kind == K_MAP; }
/* is_binary/1 */
API bool is_binary(term t) { return t->kind == K_BIN; }
/* is_list/1 */
API bool is_list(term t) { return t->kind == K_NIL || t->kind == K_CONS; }
/* is_function/1 */
API bool is_function(term t) { return t->kind == K_FUN; }
/* tuple_size/1 */
API size_t tuple_size(term t) { return t->n; }
/* elem/2 */
API term elem(term t, size_t i) { return t->item[i]; }
/* hd/1 */
API term hd(term t) { return t->item[0]; }
/* tl/1 */
API term tl(term t) { return t->item[1]; }
/* an integer's value, for C */
API int64_t int_value(term t) { return t->u.i; }

/* {tag, _, ...} of this size?  The commonest pattern match in C. */
API bool is_tagged(term t, term tag, size_t size) {
    return t->kind == K_TUPLE && t->n == size && t->item[0] == tag;
}

/* {key, value} with an atom key: one entry of a keyword list */
API bool is_tagged_pair(term t) { return t->kind == K_TUPLE && t->n == 2 && t->item[0]->kind == K_ATOM; }

/* if t, do: ... — is t truthy: anything but nil and false (atoms are
 * compared by pointer) */
API bool truthy(term t) { return t != am_nil && t != am_false; }

/* ---- Starting and stopping -------------------------------------------- */

/* Part I's start-up: its atoms, and terms built from now on go to the
 * heap of no process (there are no processes yet). */
static void terms_init(void) {
    INIT_ATOMS(TERM_ATOMS);
    alloc_heap = &outside_heap;
}

/* The last step at exit: the heap of no process, the pooled chunks and
 * the atoms go back to malloc, so that nothing kv.c allocated is left. */
static void terms_shutdown(void) {
    heap_free(&outside_heap);
    pool_drain();
    for (size_t i = 0; i < atoms.cap; i++)
        vm_free((struct term *)atoms.slots[i]); /* const to everyone else */
    vm_free(atoms.slots);
    memset(&atoms, 0, sizeof atoms);
}
/* --------------------------------------------------------------------------
 * I.4  Term order, maps and lists
 * --------------------------------------------------------------------------
 * term_cmp is Erlang's total order, the one `<` and `==` use: different
 * kinds compare by kind; numbers by value; atoms by name; tuples by size,
 * then element by element; maps by size, then keys, then values; lists
 * element by element.
 *
 * Terms can nest as deep as anyone likes: [[[[...]]]] a million levels
 * down is a fine message on BEAM, whose processes' stacks grow on the
 * heap.  A C function that recursed once per level would run off the C
 * stack long before that.  So the walks over whole terms (term_cmp here,
 * and, from Part III on, the copies that messages make) keep the work
 * still to do on a stack of their own, in vm_alloc'd memory, and loop: a list's spine, the
 * usual long direction, is followed in the loop itself, and only the
 * other branches (a head, a tuple's elements) are pushed.  No process
 * waits in the middle of a walk, so that memory is always freed before
 * the walk returns.
 */

/* One pending piece of a walk: a term, and what to do with it (the other
 * term to compare it with, or the slot its copy goes to). */
struct walk_item {
    term t;
    void *with;
};

/* The stack of pending pieces: the first 64 in the struct itself (most
 * terms need no more), then in vm_alloc'd memory. */
struct walk {
    struct walk_item *items;
    size_t n, cap;
    struct walk_item small[64];
};

static void walk_init(struct walk *w) {
    w->items = w->small;
    w->n = 0;
    w->cap = sizeof w->small / sizeof w->small[0];
}

static void walk_push(struct walk *w, term t, void *with) {
    if (w->n == w->cap) {
        size_t cap = w->cap * 2;
        struct walk_item *items = vm_realloc(w->items == w->small ? NULL : w->items, cap * sizeof *items);
        if (w->items == w->small) memcpy(items, w->small, sizeof w->small);
        w->items = items;
        w->cap = cap;
    }
    w->items[w->n].t = t;
    w->items[w->n].with = with;
    w->n++;
}

static bool walk_pop(struct walk *w, term *t, void **with) {
    if (w->n == 0) return false;
    w->n--;
    *t = w->items[w->n].t;
    *with = w->items[w->n].with;
    return true;
}

static void walk_free(struct walk *w) {
    if (w->items != w->small) vm_free(w->items);
    walk_init(w);
}

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c) return c < 0 ? -1 : 1;
    return an < bn ? -1 : an > bn;
}

/* Compare two terms that are not containers (or containers only by
 * size); 0 here means "equal so far": look inside, if they have insides. */
static int cmp_shallow(term a, term b) {
    if (a->kind != b->kind) return a->kind < b->kind ? -1 : 1;
    switch ((enum kind)a->kind) {
    case K_INT: return a->u.i < b->u.i ? -1 : a->u.i > b->u.i;
    case K_ATOM:
    case K_BIN: return cmp_bytes(BYTES(a), a->n, BYTES(b), b->n);
    case K_REF:
    case K_PID: return a->u.id < b->u.id ? -1 : a->u.id > b->u.id;
    case K_FUN: return a->u.fun == b->u.fun ? 0 : (uintptr_t)a->u.fun < (uintptr_t)b->u.fun ? -1 : 1;
    case K_TUPLE:
    case K_MAP: return a->n < b->n ? -1 : a->n > b->n;
    case K_NIL:
    case K_CONS:
    case K_MAPNODE: return 0; /* (term_cmp never meets a node: maps are flattened) */
    }
    return 0;
}

static term map_flatten(term m);
static bool map_is_tree(term m);

/* The pairs still to compare are pushed in reverse, so they pop in order:
 * the first element of a tuple is compared first, as Erlang does.  Two
 * maps of the same size compare key by key, then value by value, in key
 * order: the layout of a small map (keys, then values); a large one is
 * laid out so first, in a scratch heap of the walk's own. */
static int term_cmp(term a, term b) {
    /* Most comparisons (a map's keys) are of two atoms, numbers or
     * strings, or of different kinds: no walk is needed for those. */
    bool insides = a->kind == K_FUN || a->kind == K_TUPLE || a->kind == K_MAP || a->kind == K_CONS;
    if (a->kind != b->kind || !insides) return a == b ? 0 : cmp_shallow(a, b);
    struct walk w;
    walk_init(&w);
    struct heap scratch = {0};
    int c = 0;
    void *other = (void *)b;
    for (;;) {
        b = other;
        while (c == 0 && a != b && (c = cmp_shallow(a, b)) == 0) {
            if (a->kind == K_CONS) { /* the head now, the tail after it */
                walk_push(&w, a->item[1], (void *)b->item[1]);
                a = a->item[0], b = b->item[0];
            } else if (a->kind == K_FUN) {
                a = a->item[0], b = b->item[0];
            } else if (a->kind == K_TUPLE || a->kind == K_MAP) {
                if (a->kind == K_MAP && (map_is_tree(a) || map_is_tree(b)))
                    WITH_HEAP(&scratch, (a = map_flatten(a), b = map_flatten(b)));
                size_t items = a->kind == K_MAP ? 2 * (size_t)a->n : a->n;
                for (size_t i = items; i-- > 0;) walk_push(&w, a->item[i], (void *)b->item[i]);
                break;
            } else {
                break; /* equal atoms, numbers, ...: nothing inside */
            }
        }
        if (c != 0 || !walk_pop(&w, &a, &other)) break;
    }
    walk_free(&w);
    heap_free(&scratch);
    return c;
}

/* Kernel.==/2 */
API bool term_eq(term a, term b) { return a == b || term_cmp(a, b) == 0; }

/* ---- Maps -------------------------------------------------------------
 * A small map, of up to MAP_FLAT_MAX keys (32, as on BEAM), is an array of
 * keys kept in term order and, after them, the array of their values.
 * Finding a key is a binary search; putting one copies the arrays (maps
 * are immutable), which costs little while they are small.
 *
 * A large map cannot work that way: if every put copied every key,
 * creating n buckets in KV.Registry would cost n^2.  So past MAP_FLAT_MAX
 * keys a map becomes a balanced binary search tree, an AVL tree, whose
 * nodes are terms of their own.  A put copies only the nodes on the path
 * from the root down to its key, at most about 1.44 log2(n) of them, and
 * the new map shares every other node with the old one, which is left as
 * it was:
 *
 *        old map                 new map: put(:e)
 *          [:b]                     [:b]'         ' = a new node;
 *         /    \                   /    \         [:a] is shared
 *      [:a]    [:c]             [:a]    [:d]'
 *                 \                     /   \
 *                 [:d]               [:c]'  [:e]'
 *
 * (the tree leaned right, so the new nodes are rotated back into balance:
 * in an AVL tree the two subtrees of any node differ in height by at most
 * one, so the path from the root to any key is short.)  Three layouts,
 * then, each a term:
 *
 *     a small map   K_MAP, n keys               items: k1 .. kn, v1 .. vn
 *     a large map   K_MAP, n keys, u.i = MAP_TREE   items: the root node
 *     a node        K_MAPNODE, u.i = its height     items: key, value,
 *                                                   left, right ([]: none)
 *
 * Every map is in key order, small or large, so every map prints in key
 * order.  (BEAM switches to a hash trie past 32 keys, and prints those in
 * hash order.)  A large map is laid out flat, in a scratch heap, when it
 * is printed or compared; MAP_TREE maps only ever hold more than
 * MAP_FLAT_MAX keys, so each map has one layout for its size. */

#define MAP_FLAT_MAX 32
#define MAP_TREE 1

static bool map_is_tree(term m) { return m->u.i == MAP_TREE; }

/* A small map's i-th key and value, and where key is in it. */
static term map_key(term m, size_t i) { return m->item[i]; }
static term map_value(term m, size_t i) { return m->item[m->n + i]; }

/* Index of key in the small map m, or -(insertion point) - 1. */
static long map_find(term m, term key) {
    long lo = 0, hi = (long)m->n - 1;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        int c = term_cmp(m->item[mid], key);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return -lo - 1;
}

static struct term *map_alloc(size_t n) { return term_alloc(K_MAP, (uint32_t)n, 2 * n); }

/* The tree.  The functions that change it recurse once per level, which
 * is safe here: an AVL tree of 2^32 keys is less than 47 levels deep. */

static term node_key(term t) { return t->item[0]; }
static term node_value(term t) { return t->item[1]; }
static term node_left(term t) { return t->item[2]; }
static term node_right(term t) { return t->item[3]; }
static int node_height(term t) { return t == NIL ? 0 : (int)t->u.i; }

static term node_new(term key, term value, term left, term right) {
    struct term *t = term_alloc(K_MAPNODE, 4, 4);
    t->item[0] = key, t->item[1] = value, t->item[2] = left, t->item[3] = right;
    int hl = node_height(left), hr = node_height(right);
    t->u.i = 1 + (hl > hr ? hl : hr);
    return t;
}

/* A node for key and value over l and r, subtrees whose heights differ by
 * at most two (as a put or a removal just below leaves them), rotated so
 * that they differ by at most one.  Left-heavy by two, say:
 *
 *          [k]               [x]           when x's left is the taller;
 *         /   \             /   \          when its right is, that
 *       [x]    r    =>    xl    [k]        grandchild rises instead,
 *      /   \                   /   \       with x and k as its
 *     xl   xr                 xr    r      children (the double turn)
 */
static term node_balance(term key, term value, term l, term r) {
    int hl = node_height(l), hr = node_height(r);
    if (hl > hr + 1) {
        if (node_height(node_left(l)) >= node_height(node_right(l)))
            return node_new(node_key(l), node_value(l), node_left(l), node_new(key, value, node_right(l), r));
        term g = node_right(l);
        return node_new(node_key(g), node_value(g), node_new(node_key(l), node_value(l), node_left(l), node_left(g)),
                        node_new(key, value, node_right(g), r));
    }
    if (hr > hl + 1) {
        if (node_height(node_right(r)) >= node_height(node_left(r)))
            return node_new(node_key(r), node_value(r), node_new(key, value, l, node_left(r)), node_right(r));
        term g = node_left(r);
        return node_new(node_key(g), node_value(g), node_new(key, value, l, node_left(g)),
                        node_new(node_key(r), node_value(r), node_right(g), node_right(r)));
    }
    return node_new(key, value, l, r);
}

/* t with key => value; *added says whether key is new. */
static term node_insert(term t, term key, term value, bool *added) {
    if (t == NIL) {
        *added = true;
        return node_new(key, value, NIL, NIL);
    }
    int c = term_cmp(key, node_key(t));
    if (c == 0) return node_new(node_key(t), value, node_left(t), node_right(t));
    if (c < 0) return node_balance(node_key(t), node_value(t), node_insert(node_left(t), key, value, added), node_right(t));
    return node_balance(node_key(t), node_value(t), node_left(t), node_insert(node_right(t), key, value, added));
}

/* The value under key in the tree t, or NULL. */
static term node_lookup(term t, term key) {
    while (t != NIL) {
        int c = term_cmp(key, node_key(t));
        if (c == 0) return node_value(t);
        t = c < 0 ? node_left(t) : node_right(t);
    }
    return NULL;
}

/* A tree of the n keys (in order) and values: the middle one at the root. */
static term node_build(const term *keys, const term *values, size_t n) {
    if (n == 0) return NIL;
    size_t mid = n / 2;
    return node_new(keys[mid], values[mid], node_build(keys, values, mid),
                    node_build(keys + mid + 1, values + mid + 1, n - mid - 1));
}

static term map_tree(size_t n, term root) {
    struct term *m = term_alloc(K_MAP, (uint32_t)n, 1);
    m->u.i = MAP_TREE;
    m->item[0] = root;
    return m;
}

/* Walking a map in key order, small or large: a large map's walk keeps
 * the nodes whose keys are still to come on a stack (the left edge of
 * what is left), 64 deep at most. */
struct map_iter {
    term m;
    size_t i;        /* a small map: the next index */
    term stack[64];  /* a large one: the nodes still to visit */
    int depth;
};

static void map_iter_left_edge(struct map_iter *it, term t) {
    for (; t != NIL; t = node_left(t)) it->stack[it->depth++] = t;
}

static void map_iter_start(struct map_iter *it, term m) {
    it->m = m;
    it->i = 0;
    it->depth = 0;
    if (map_is_tree(m)) map_iter_left_edge(it, m->item[0]);
}

/* The next key and value, in key order; false at the end. */
static bool map_iter_next(struct map_iter *it, term *key, term *value) {
    if (!map_is_tree(it->m)) {
        if (it->i == it->m->n) return false;
        *key = map_key(it->m, it->i);
        *value = map_value(it->m, it->i);
        it->i++;
        return true;
    }
    if (it->depth == 0) return false;
    term t = it->stack[--it->depth];
    *key = node_key(t);
    *value = node_value(t);
    map_iter_left_edge(it, node_right(t));
    return true;
}

/* The n keys and values under root, laid out as a small map is (however
 * many there are): for printing, comparing, and a map that shrinks back
 * to MAP_FLAT_MAX keys. */
static term map_flat_of(term root, size_t n) {
    struct term *r = map_alloc(n);
    struct map_iter it;
    term key, value;
    map_iter_start(&it, map_tree(n, root));
    for (size_t i = 0; map_iter_next(&it, &key, &value); i++) r->item[i] = key, r->item[n + i] = value;
    return r;
}

static term map_flatten(term m) { return map_is_tree(m) ? map_flat_of(m->item[0], m->n) : m; }

/* The value under key, or dflt.  Inside the VM, where m is known to be a
 * map, these unchecked forms are used.
 * Map.get/3 and the rest of the Map module check m first (III.9).    //> agents
 */
static term map_lookup(term m, term key, term dflt) {
    if (map_is_tree(m)) {
        term v = node_lookup(m->item[0], key);
        return v ? v : dflt;
    }
    long i = map_find(m, key);
    return i >= 0 ? map_value(m, (size_t)i) : dflt;
}

/* key is in m */
static bool map_has(term m, term key) { return map_lookup(m, key, NULL) != NULL; }

/* m with key => value: a new map, m unchanged.  A small map that grows
 * past MAP_FLAT_MAX keys becomes a tree, built from its arrays. */
static term map_insert(term m, term key, term value) {
    if (map_is_tree(m)) {
        bool added = false;
        term root = node_insert(m->item[0], key, value, &added);
        return map_tree(m->n + added, root);
    }
    long i = map_find(m, key);
    size_t n = m->n, at;
    struct term *r;
    if (i >= 0) { /* replace */
        r = map_alloc(n);
        memcpy(r->item, m->item, 2 * n * sizeof(term));
        r->item[n + (size_t)i] = value;
        return r;
    }
    at = (size_t)(-i - 1);
    r = map_alloc(n + 1);
    for (size_t j = 0; j < at; j++) {
        r->item[j] = m->item[j];
        r->item[n + 1 + j] = m->item[n + j];
    }
    r->item[at] = key;
    r->item[n + 1 + at] = value;
    for (size_t j = at; j < n; j++) {
        r->item[j + 1] = m->item[j];
        r->item[n + 1 + j + 1] = m->item[n + j];
    }
    if (n + 1 > MAP_FLAT_MAX) return map_tree(n + 1, node_build(r->item, r->item + n + 1, n + 1));
    return r;
}

/* %{} */
API term empty_map(void) { return map_alloc(0); }

/* %{k1 => v1, ...} — map(2, k1, v1, k2, v2): n pairs, any order. */
API term map(size_t n, ...) {
    term m = empty_map();
    va_list ap;
    va_start(ap, n);
    for (size_t i = 0; i < n; i++) {
        term k = va_arg(ap, term);
        term v = va_arg(ap, term);
        m = map_insert(m, k, v);
    }
    va_end(ap);
    return m;
}

/* Building a list front to back, in one pass and without recursion: each
 * new cell is stored where the previous cell's tail goes (the "hole"),
 * and the last hole gets the list's tail at the end.  The cells are new
 * and nobody else has seen them yet, so this is still building a term,
 * not changing one. */
struct list_builder {
    term head;
    term *hole;
};

static void list_builder_init(struct list_builder *b) {
    b->head = NIL;
    b->hole = &b->head;
}

static void list_builder_add(struct list_builder *b, term x) {
    struct term *c = term_alloc(K_CONS, 0, 2);
    c->item[0] = x;
    c->item[1] = NIL;
    *b->hole = c;
    b->hole = &c->item[1];
}

static term list_builder_done(struct list_builder *b, term tail) {
    *b->hole = tail;
    return b->head;
}

/* Keyword.split/2: the pairs of kw whose key is one of `keys` (ending with
 * NULL) in *taken, the others (anything else too) in *rest, in order. */
API void keyword_split(term kw, const term *keys, term *taken, term *rest) {
    struct list_builder mine, others;
    list_builder_init(&mine);
    list_builder_init(&others);
    for (; kw->kind == K_CONS; kw = tl(kw)) {
        term pair = hd(kw);
        bool wanted = false;
        for (size_t i = 0; keys[i] && is_tagged_pair(pair); i++) wanted = wanted || keys[i] == elem(pair, 0);
        list_builder_add(wanted ? &mine : &others, pair);
    }
    *taken = list_builder_done(&mine, NIL);
    *rest = list_builder_done(&others, NIL);
}

/* Kernel.++/2 */
API term list_concat(term a, term b) {
    struct list_builder r;
    list_builder_init(&r);
    for (; a->kind == K_CONS; a = tl(a)) list_builder_add(&r, hd(a));
    return list_builder_done(&r, b);
}

/* list ++ [x] */
API term list_append(term l, term x) { return list_concat(l, list(1, x)); }

/* --------------------------------------------------------------------------
 * I.5  Inspect: printing terms the way iex does
 * --------------------------------------------------------------------------
 * Elixir's inspect/2 does not print directly.  It builds a *document* out of
 * strings, breaks (places where a line may end), nests (indentation) and
 * groups (runs of breaks decided together), then lays the document out for
 * a given width: that is Inspect.Algebra, after Lindig's "Strictly Pretty".
 * inspect/1 lays out with infinite width, so everything stays on one line;
 * iex lays out results at 80 columns, which is why a long map comes back
 * one key per line.  kv.c builds the same documents and lays them out
 * with the same rules, so both kinds of output match Elixir 1.14's.
 *
 * An example.  The document for %{a: 1, b: [2, 3]} is, roughly,
 *
 *     group("%{" nest(2, break("") "a: 1" "," break(" ") "b: " LIST)
 *           break("") "}")
 *     LIST = group("[" nest(1, "2" "," flex_break(" ") "3") "]")
 *
 * Laid out in 80 columns, the outer group fits on the line, so every break
 * in it prints its text (nothing, or a space):
 *
 *     %{a: 1, b: [2, 3]}
 *
 * In 12 columns it does not fit: its breaks become newlines, indented by
 * the nest around them.  The inner group, LIST, is decided on its own, and
 * it still fits on its line:
 *
 *     %{
 *       a: 1,
 *       b: [2, 3]
 *     }
 *
 * Lists of plain items (numbers, atoms, strings) use flex breaks, which
 * fill each line as far as they can: that is how iex prints a long list of
 * integers.  Maps, keyword lists and lists of containers use strict breaks:
 * one item per line once the group does not fit.  Tuples are always flex.
 * Collections show at most 50 items, then "...", like inspect's :limit.
 */

enum doc_kind { DOC_NIL, DOC_STR, DOC_CONS, DOC_NEST, DOC_BREAK, DOC_GROUP };

struct doc {
    enum doc_kind kind;
    bool flex;                 /* DOC_BREAK: flex (fill the line) or strict */
    int indent;                /* DOC_NEST */
    const char *s;             /* DOC_STR and DOC_BREAK text */
    size_t len;
    const struct doc *a, *b;   /* DOC_CONS: a then b; NEST, GROUP: a */
};

/* Documents live in a scratch heap that is dropped after printing. */
static struct heap doc_heap;

static const struct doc *doc_new(enum doc_kind kind, const char *s, size_t len,
                                 const struct doc *a, const struct doc *b) {
    struct doc *d = heap_alloc(&doc_heap, sizeof *d);
    d->kind = kind;
    d->flex = false;
    d->indent = 0;
    d->s = s;
    d->len = len;
    d->a = a;
    d->b = b;
    return d;
}

static const struct doc doc_nil = {.kind = DOC_NIL};

/* A copy of s (len bytes) as a string document. */
static const struct doc *doc_text(const char *s, size_t len) {
    char *copy = heap_alloc(&doc_heap, len + 1);
    memcpy(copy, s, len);
    copy[len] = '\0';
    return doc_new(DOC_STR, copy, len, NULL, NULL);
}

static const struct doc *doc_str(const char *s) { return doc_text(s, strlen(s)); }

static const struct doc *doc_buf(struct buf *b) {
    const struct doc *d = doc_text(buf_str(b), b->len);
    buf_free(b);
    return d;
}

static const struct doc *concat(const struct doc *a, const struct doc *b) {
    return doc_new(DOC_CONS, NULL, 0, a, b);
}

static const struct doc *nest(const struct doc *d, int indent) {
    struct doc *n = (struct doc *)doc_new(DOC_NEST, NULL, 0, d, NULL);
    n->indent = indent;
    return n;
}

static const struct doc *doc_break(const char *s, bool flex) {
    struct doc *d = (struct doc *)doc_new(DOC_BREAK, s, strlen(s), NULL, NULL);
    d->flex = flex;
    return d;
}

static const struct doc *group(const struct doc *d) {
    return doc_new(DOC_GROUP, NULL, 0, d, NULL);
}

/* a <break> b */
static const struct doc *glue(const struct doc *a, const char *brk, bool flex,
                              const struct doc *b) {
    return concat(a, concat(doc_break(brk, flex), b));
}

/* "Simple" documents are plain text: containers of simple items may fill
 * lines (flex breaks) instead of taking one line per item. */
static bool doc_simple(const struct doc *d) {
    if (d->kind == DOC_CONS) return doc_simple(d->a) && doc_simple(d->b);
    return d->kind == DOC_STR || d->kind == DOC_NIL;
}

/* ---- Laying out a document ---------------------------------------------
 * The layout walks a stack of (indent, mode, doc) entries.  In FLAT mode a
 * break prints its text; in BREAK mode a strict break becomes a newline and
 * a flex break becomes a newline only if the next stretch would not fit.  A
 * group is laid out FLAT if its contents fit on the rest of the line. */

enum mode { FLAT, BREAK, TAIL };
struct entry {
    int indent;
    enum mode mode;
    bool b;             /* TAIL entries: the saved "seen a break" flag */
    const struct doc *doc;
};

struct doc_stack {
    struct entry *e;
    size_t n, cap;
};

static void push(struct doc_stack *s, int indent, enum mode mode, const struct doc *d) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        s->e = vm_realloc(s->e, cap * sizeof *s->e);
        s->cap = cap;
    }
    s->e[s->n++] = (struct entry){indent, mode, false, d};
}

/* Does the text up to the next possible newline fit in w columns, starting
 * at column k?  `first` is a group's contents (or NULL); `rest`/`nrest` is
 * the remainder of the document, read but not consumed.  `b` becomes true
 * once a break has been passed: overflowing only counts after that, so a
 * long word with no break in it is allowed to stick out. */
static bool fits(long w, long k, bool b, const struct doc *first, int indent,
                 const struct entry *rest, size_t nrest) {
    struct doc_stack local = {0};
    bool answer = true;
    if (first) push(&local, indent, FLAT, first);
    for (;;) {
        if (k > w && b) { answer = false; break; }
        struct entry e;
        if (local.n) e = local.e[--local.n];
        else if (nrest) e = rest[--nrest];
        else break;
        if (e.mode == TAIL) { b = e.b; continue; }
        const struct doc *d = e.doc;
        switch (d->kind) {
        case DOC_NIL: break;
        case DOC_STR: k += (long)d->len; break;
        case DOC_CONS:
            push(&local, e.indent, e.mode, d->b);
            push(&local, e.indent, e.mode, d->a);
            break;
        case DOC_NEST: push(&local, e.indent + d->indent, e.mode, d->a); break;
        case DOC_GROUP:
            push(&local, 0, TAIL, NULL);
            local.e[local.n - 1].b = b;
            push(&local, e.indent, FLAT, d->a);
            break;
        case DOC_BREAK:
            if (e.mode == BREAK) goto done; /* the line may end here */
            k += (long)d->len;
            b = true;
            break;
        }
    }
done:
    vm_free(local.e);
    return answer;
}

static void newline(struct buf *out, int indent) {
    buf_puts(out, "\n");
    for (int i = 0; i < indent; i++) buf_puts(out, " ");
}

/* Inspect.Algebra.format/2: lay out d in `width` columns (LONG_MAX: no limit). */
static void doc_format(struct buf *out, const struct doc *d, long width) {
    struct doc_stack s = {0};
    long k = 0;
    push(&s, 0, FLAT, d);
    while (s.n) {
        struct entry e = s.e[--s.n];
        d = e.doc;
        switch (d->kind) {
        case DOC_NIL: break;
        case DOC_STR:
            buf_add(out, d->s, d->len);
            k += (long)d->len;
            break;
        case DOC_CONS:
            push(&s, e.indent, e.mode, d->b);
            push(&s, e.indent, e.mode, d->a);
            break;
        case DOC_NEST: push(&s, e.indent + d->indent, e.mode, d->a); break;
        case DOC_GROUP: {
            bool flat = width == LONG_MAX || fits(width, k, false, d->a, e.indent, NULL, 0);
            push(&s, e.indent, flat ? FLAT : BREAK, d->a);
            break;
        }
        case DOC_BREAK:
            if (d->flex) {
                long k2 = k + (long)d->len;
                if (width == LONG_MAX || e.mode == FLAT || fits(width, k2, true, NULL, 0, s.e, s.n)) {
                    buf_add(out, d->s, d->len);
                    k = k2;
                } else {
                    newline(out, e.indent);
                    k = e.indent;
                }
            } else if (e.mode == BREAK) {
                newline(out, e.indent);
                k = e.indent;
            } else {
                buf_add(out, d->s, d->len);
                k += (long)d->len;
            }
            break;
        }
    }
    vm_free(s.e);
}

/* ---- From terms to documents ------------------------------------------ */

#define INSPECT_LIMIT 50 /* items per collection, as inspect's :limit */

static const struct doc *to_doc(term t, long limit);

static bool is_ident_start(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static bool is_ident_char(unsigned char c) {
    return is_ident_start(c) || (c >= '0' && c <= '9') || c == '@';
}

/* [A-Za-z_][A-Za-z0-9_@]*[?!]? — printable without quotes. */
static bool is_identifier(const char *s, size_t n) {
    if (n == 0 || !is_ident_start((unsigned char)s[0])) return false;
    size_t end = (s[n - 1] == '?' || s[n - 1] == '!') ? n - 1 : n;
    for (size_t i = 1; i < end; i++)
        if (!is_ident_char((unsigned char)s[i])) return false;
    return true;
}

static bool is_operator(const char *s, size_t n) {
    static const char *const ops[] = {
        "+", "-", "*", "/", "**", "++", "--", "+++", "---", "..", "...", "<>",
        "|>", "<<<", ">>>", "<<~", "~>>", "<~", "~>", "<~>", "&&", "&&&",
        "||", "|||", "==", "!=", "=~", "===", "!==", "<", ">", "<=", ">=",
        "=", "!", "^", "&", "|", "\\\\", "->", "<-", "@", ".", "%", "%{}",
        "{}", "<<>>", "..//", NULL};
    for (size_t i = 0; ops[i]; i++)
        if (strlen(ops[i]) == n && memcmp(ops[i], s, n) == 0) return true;
    return false;
}

/* "Elixir.Foo.Bar": every piece after a dot starts with a capital. */
static bool is_alias(const char *s, size_t n) {
    if (n <= 7 || memcmp(s, "Elixir.", 7) != 0) return false;
    for (size_t i = 6; i < n;) {
        if (s[i] != '.' || i + 1 >= n || !(s[i + 1] >= 'A' && s[i + 1] <= 'Z')) return false;
        i += 2;
        while (i < n && s[i] != '.' && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
                                        (s[i] >= '0' && s[i] <= '9') || s[i] == '_'))
            i++;
        if (i < n && s[i] != '.') return false;
    }
    return true;
}

/* Code.Identifier.escape/2: the text of a quoted string, atom or charlist. */
static void escape_into(struct buf *b, const char *s, size_t n, char quote) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *e = NULL;
        switch (c) {
        case 7: e = "\\a"; break;
        case 8: e = "\\b"; break;
        case 9: e = "\\t"; break;
        case 10: e = "\\n"; break;
        case 11: e = "\\v"; break;
        case 12: e = "\\f"; break;
        case 13: e = "\\r"; break;
        case 27: e = "\\e"; break;
        case 127: e = "\\d"; break;
        case '\\': e = "\\\\"; break;
        case 0: e = "\\0"; break;
        default: break;
        }
        if (e) buf_puts(b, e);
        else if (c == (unsigned char)quote) { buf_add(b, "\\", 1); buf_add(b, s + i, 1); }
        else if (c == '#' && i + 1 < n && s[i + 1] == '{') buf_puts(b, "\\#");
        else if (c < 32) buf_printf(b, "\\x%02X", c);
        else buf_add(b, s + i, 1);
    }
}

/* How an atom is written: nil, true and false bare; KV.Registry without
 * its "Elixir." prefix; :ok and :+ bare; :"$gen_call" quoted; as a keyword
 * key, name: or +: (operators need no quotes there either, as in 1.14).
 * The atom Elixir prints bare as a value, but as a key 1.14 quotes it,
 * "Elixir": 1, because Elixir: would read as the alias. */
static void atom_text(struct buf *b, term a, bool as_key) {
    const char *s = BYTES(a);
    size_t n = a->n;
    bool is_elixir = n == 6 && memcmp(s, "Elixir", 6) == 0;
    bool plain = is_identifier(s, n) || is_operator(s, n);
    if (as_key) {
        plain = plain && !is_elixir;
        if (plain) { buf_add(b, s, n); buf_puts(b, ":"); }
        else { buf_puts(b, "\""); escape_into(b, s, n, '"'); buf_puts(b, "\":"); }
        return;
    }
    if (a == am_nil || a == am_true || a == am_false) buf_add(b, s, n);
    else if (is_elixir) buf_add(b, s, n);
    else if (is_alias(s, n)) buf_add(b, s + 7, n - 7);
    else if (plain) { buf_puts(b, ":"); buf_add(b, s, n); }
    else { buf_puts(b, ":\""); escape_into(b, s, n, '"'); buf_puts(b, "\""); }
}

/* Length of the UTF-8 sequence starting at s (0 if invalid). */
static size_t utf8_len(const unsigned char *s, size_t n, uint32_t *cp) {
    if (s[0] < 0x80) { *cp = s[0]; return 1; }
    size_t len = (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || len > n) return 0;
    uint32_t c = s[0] & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    static const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < min[len] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    *cp = c;
    return len;
}

/* String.printable?/1: valid UTF-8 of printable characters. */
static bool string_printable(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        size_t len = utf8_len(u + i, n - i, &c);
        if (len == 0) return false;
        bool ok = (c >= 32 && c <= 126) || (c >= 7 && c <= 13) || c == 27 || c == 127 ||
                  (c >= 0xA0 && c <= 0xD7FF) || (c >= 0xE000 && c <= 0xFFFD) || c >= 0x10000;
        if (!ok) return false;
        i += len;
    }
    return true;
}

/* List.ascii_printable?/1: a list that prints as a charlist, 'kv'. */
static bool charlist_printable(term l) {
    if (l->kind != K_CONS) return false;
    for (; l->kind == K_CONS; l = tl(l)) {
        term c = hd(l);
        if (c->kind != K_INT) return false;
        int64_t v = c->u.i;
        if (!((v >= 32 && v <= 126) || (v >= 7 && v <= 13) || v == 27)) return false;
    }
    return l->kind == K_NIL;
}

/* [name: value] lists print as keywords: every item {atom, _}, no alias. */
static bool is_keyword(term l) {
    for (; l->kind == K_CONS; l = tl(l)) {
        term p = hd(l);
        if (!is_tuple(p) || tuple_size(p) != 2 || !is_atom(elem(p, 0))) return false;
        term k = elem(p, 0);
        if (k->n >= 7 && memcmp(BYTES(k), "Elixir.", 7) == 0) return false;
    }
    return true;
}

static const struct doc *keyword_doc(term key, term value, long limit) {
    struct buf b = {0};
    atom_text(&b, key, true);
    return concat(doc_buf(&b), concat(doc_str(" "), to_doc(value, limit)));
}

/* How a collection's items become documents. */
enum item_style { ITEM_PLAIN, ITEM_KEYWORD, ITEM_ASSOC, ITEM_FIELD };

struct items {
    enum item_style style;
    term src;          /* the tuple, list, or map */
    size_t count;      /* items in src */
    term tail;         /* an improper list's tail, or NULL */
    const term *fields;/* ITEM_FIELD: struct field names, in definition order */
};

static term item_at(const struct items *it, size_t i, term *value) {
    term src = it->src;
    switch (it->style) {
    case ITEM_PLAIN:
        if (src->kind == K_TUPLE) return elem(src, i);
        for (; i; i--) src = tl(src);
        return hd(src);
    case ITEM_KEYWORD: {
        for (; i; i--) src = tl(src);
        term pair = hd(src);
        *value = elem(pair, 1);
        return elem(pair, 0);
    }
    case ITEM_ASSOC:
        *value = map_value(src, i);
        return map_key(src, i);
    case ITEM_FIELD:
        *value = map_lookup(src, it->fields[i], am_nil);
        return it->fields[i];
    }
    return NIL;
}

static const struct doc *item_doc(const struct items *it, size_t i, long limit) {
    term value = NULL;
    term key = item_at(it, i, &value);
    switch (it->style) {
    case ITEM_PLAIN: return to_doc(key, limit);
    case ITEM_KEYWORD:
    case ITEM_FIELD: return keyword_doc(key, value, limit);
    case ITEM_ASSOC:
        return concat(concat(to_doc(key, limit), doc_str(" => ")), to_doc(value, limit));
    }
    return &doc_nil;
}

static const struct doc *join(const struct doc *a, const struct doc *b, bool flex, const char *sep) {
    return glue(concat(a, doc_str(sep)), " ", flex, b);
}

/* Inspect.Algebra.container_doc/6.  `brk` is the container's break style:
 * "maybe" (lists: flex if every item is plain text), "flex" (tuples) or
 * "strict" (maps and keywords: one item per line when it doesn't fit). */
enum break_style { BREAK_MAYBE, BREAK_FLEX, BREAK_STRICT };

static const struct doc *container_doc_nest(const char *left, const struct items *it, const char *right,
                                            long limit, enum break_style brk, int indent) {
    if (it->count == 0) return concat(doc_str(left), doc_str(right));
    const struct doc **docs = vm_realloc(NULL, (it->count + 2) * sizeof *docs);
    size_t n = 0;
    bool simple = brk == BREAK_MAYBE;
    for (size_t i = 0; i < it->count; i++) {
        if (limit == 0) { docs[n++] = doc_str("..."); break; }
        limit = limit == LONG_MAX ? limit : limit - 1;
        const struct doc *d;
        if (it->tail && i == it->count - 1) { /* [last | tail] */
            const struct doc *l = item_doc(it, i, limit), *r = to_doc(it->tail, limit);
            simple = simple && doc_simple(l) && doc_simple(r);
            d = join(l, r, simple, " |");
        } else {
            d = item_doc(it, i, limit);
            simple = simple && doc_simple(d);
        }
        docs[n++] = d;
    }
    bool flex = simple || brk == BREAK_FLEX;
    const struct doc *body = n ? docs[n - 1] : &doc_nil;
    for (size_t i = n - 1; i-- > 0;) body = join(docs[i], body, flex, ",");
    vm_free(docs);
    if (flex) return group(concat(concat(doc_str(left), nest(body, indent)), doc_str(right)));
    return group(glue(nest(glue(doc_str(left), "", false, body), 2), "", false, doc_str(right)));
}

/* A broken list or tuple goes on one column right of its bracket. */
static const struct doc *container_doc(const char *left, const struct items *it, const char *right,
                                       long limit, enum break_style brk) {
    return container_doc_nest(left, it, right, limit, brk, 1);
}

/* Exception structs print as %Name{field: value, ...} in the order their
 * module defines the fields, like Elixir; unknown structs print as maps.
 * (Exceptions arrive with processes, in agents.md's chapter.) */
struct struct_def {
    const char *name; /* without Elixir. */
    const char *fields[7];
};

static const struct struct_def struct_defs[] = {
    {"RuntimeError", {"message"}}, //> agents
    {"ArgumentError", {"message"}}, //> agents
    {"MatchError", {"term"}}, //> agents
    {"FunctionClauseError", {"module", "function", "arity", "kind", "args", "clauses"}}, //> agents
    {"ErlangError", {"original", "reason"}}, //> agents
    {"UndefinedFunctionError", {"module", "function", "arity", "reason", "message"}}, //> agents
    {"BadFunctionError", {"term"}}, //> agents
    {"BadMapError", {"term"}}, //> agents
    {"BadArityError", {"function", "args"}}, //> agents
    {"SystemLimitError", {"message"}}, //> agents
    {"ExUnit.AssertionError", {"left", "right", "message", "expr", "args", "doctest", "context"}}, //> agents
    {NULL, {NULL}},
};

static const struct doc *struct_doc(term m, long limit) {
    term name = map_lookup(m, am_struct_, NULL);
    if (!name || !is_atom(name) || !is_alias(BYTES(name), name->n)) return NULL;
    for (const struct struct_def *sd = struct_defs; sd->name; sd++) {
        if (strcmp(BYTES(name) + 7, sd->name) != 0) continue;
        term fields[7];
        size_t nf = 0;
        for (; nf < 7 && sd->fields[nf]; nf++) fields[nf] = atom(sd->fields[nf]);
        bool exception = map_has(m, am_exception_);
        if (m->n != nf + 1 + exception) return NULL; /* not exactly this struct */
        for (size_t i = 0; i < nf; i++)
            if (!map_has(m, fields[i])) return NULL;
        struct items it = {ITEM_FIELD, m, nf, NULL, fields};
        char left[80];
        snprintf(left, sizeof left, "%%%s{", sd->name);
        return container_doc(left, &it, "}", limit, BREAK_STRICT);
    }
    return NULL;
}

/* to_doc recurses once per level of nesting, on the C stack.  Elixir's
 * inspect has no depth limit (BEAM stacks grow on the heap); kv.c prints
 * "..." below INSPECT_DEPTH levels instead of running off the C stack:
 * a crash report about a term nested a million deep must not stop the VM. */
#define INSPECT_DEPTH 5000
static int inspect_depth;

static const struct doc *term_doc(term t, long limit);

static const struct doc *to_doc(term t, long limit) {
    if (inspect_depth >= INSPECT_DEPTH) return doc_str("...");
    inspect_depth++;
    const struct doc *d = term_doc(t, limit);
    inspect_depth--;
    return d;
}

static const struct doc *term_doc(term t, long limit) {
    struct buf b = {0};
    switch ((enum kind)t->kind) {
    case K_INT:
        buf_printf(&b, "%" PRId64, t->u.i);
        return doc_buf(&b);
    case K_ATOM:
        atom_text(&b, t, false);
        return doc_buf(&b);
    case K_REF:
        buf_printf(&b, "#Reference<0.0.0.%" PRIu64 ">", t->u.id);
        return doc_buf(&b);
    case K_PID:
        buf_printf(&b, "#PID<0.%" PRIu64 ".0>", t->u.id);
        return doc_buf(&b);
    case K_FUN:
        buf_printf(&b, "#Function<%s/%d in %s>", t->u.fun->name, t->u.fun->arity,
                   t->u.fun->defined_in);
        return doc_buf(&b);
    case K_BIN:
        if (string_printable(BYTES(t), t->n)) {
            buf_puts(&b, "\"");
            escape_into(&b, BYTES(t), t->n, '"');
            buf_puts(&b, "\"");
            return doc_buf(&b);
        } else {
            struct items it = {ITEM_PLAIN, NIL, 0, NULL, NULL};
            term bytes = NIL;
            for (size_t i = t->n; i-- > 0;) bytes = cons(integer((unsigned char)BYTES(t)[i]), bytes);
            it.src = bytes;
            it.count = t->n;
            /* Inspect.BitString indents by the width of "<<", not by one. */
            return container_doc_nest("<<", &it, ">>", limit, BREAK_FLEX, 2);
        }
    case K_TUPLE: {
        struct items it = {ITEM_PLAIN, t, t->n, NULL, NULL};
        return container_doc("{", &it, "}", limit, BREAK_FLEX);
    }
    case K_MAP: {
        const struct doc *sd = struct_doc(t, limit);
        if (sd) return sd;
        t = map_flatten(t); /* a large map, laid out as a small one */
        bool keyword = true;
        for (size_t i = 0; i < t->n; i++) {
            term k = map_key(t, i);
            if (!is_atom(k) || (k->n >= 7 && memcmp(BYTES(k), "Elixir.", 7) == 0)) keyword = false;
        }
        struct items it = {keyword ? ITEM_KEYWORD : ITEM_ASSOC, t, t->n, NULL, NULL};
        if (keyword) { /* the keyword style reads pairs from a list */
            term pairs = NIL;
            for (size_t i = t->n; i-- > 0;) pairs = cons(tuple(2, map_key(t, i), map_value(t, i)), pairs);
            it.src = pairs;
        }
        return container_doc("%{", &it, "}", limit, BREAK_STRICT);
    }
    case K_NIL:
        return doc_str("[]");
    case K_CONS: {
        if (charlist_printable(t)) {
            /* Escaped as a whole, not char by char: '#{' needs a look ahead. */
            struct buf chars = {0};
            for (term l = t; l->kind == K_CONS; l = tl(l)) {
                char c = (char)hd(l)->u.i;
                buf_add(&chars, &c, 1);
            }
            buf_puts(&b, "'");
            escape_into(&b, chars.s, chars.len, '\'');
            buf_puts(&b, "'");
            buf_free(&chars);
            return doc_buf(&b);
        }
        size_t n = 0;
        term l = t;
        for (; l->kind == K_CONS; l = tl(l)) n++;
        term tail = l->kind == K_NIL ? NULL : l;
        bool keyword = !tail && is_keyword(t);
        struct items it = {keyword ? ITEM_KEYWORD : ITEM_PLAIN, t, n, tail, NULL};
        return container_doc("[", &it, "]", limit, keyword ? BREAK_STRICT : BREAK_MAYBE);
    }
    case K_MAPNODE: /* never a value of its own: printed with its map */
        break;
    }
    return &doc_nil;
}

/* inspect(t, pretty: true, width: width) — appended to b.  iex prints
 * results this way, at 80 columns. */
static void inspect_pretty_to(struct buf *b, term t, long width) {
    /* The byte lists and pair lists to_doc builds are scratch terms: they
     * go to the scratch heap, to vanish with the documents. */
    struct heap *saved = alloc_heap;
    alloc_heap = &doc_heap;
    doc_format(b, to_doc(t, INSPECT_LIMIT), width);
    alloc_heap = saved;
    heap_free(&doc_heap);
}

/* inspect/1 — the one-line form of t, appended to b. */
API void inspect_to(struct buf *b, term t) { inspect_pretty_to(b, t, LONG_MAX); }

//> agents
/* Append fmt to b, each %T replaced by the next term argument, inspected:
 * Elixir's "... #{inspect(t)} ..." in C. */
static void buf_terms(struct buf *b, const char *fmt, va_list ap) {
    for (const char *p = fmt; *p; p++) {
        if (p[0] == '%' && p[1] == 'T') {
            inspect_to(b, va_arg(ap, term));
            p++;
        } else {
            buf_add(b, p, 1);
        }
    }
}
//> introduction-to-mix

/* ==========================================================================
 * PART II — introduction-to-mix.md: "Introduction to Mix"
 * ==========================================================================
 *
 * `mix new kv --module KV` makes a project with one module, KV, whose one
 * function answers :world, a test for it, and a doctest.  The first stage,
 * chapters/0-introduction-to-mix, is that project's twin: the terms above,
 * this module, and kv_test.c with its first tests.
 */

/* --------------------------------------------------------------------------
 * introduction-to-mix.md — "Our first project", "Project compilation"
 * --------------------------------------------------------------------------
 * KV's hello/0 lived here until "The application callback"           //> supervisor-and-application/callback
 * (supervisor-and-application.md) made KV the application's callback //> supervisor-and-application/callback
 * module, and the guide removed it.                                   //> supervisor-and-application/callback
 */

/* retired at supervisor-and-application/callback: KV becomes the application callback module
// KV.hello/0 — what `mix new` writes: :world
API term kv_hello(void) { return atom("world"); }
*/

/* --------------------------------------------------------------------------
 * introduction-to-mix.md — "Running tests"
 * --------------------------------------------------------------------------
 * The harness that runs the tests, and prints what `mix test` prints, is
 * in kv_test.c.  (Mix's own environments, formatter and tasks have no twin
 * here: the project is this file and its Makefile.)
 */

/* retired at supervisor-and-application/callback: KV.hello goes, and its tests with it
// The generated test, "greets the world", and the doctest of KV.hello are
// in kv_test.c too.
*/

//> agents
/* ==========================================================================
 * PART III — PROCESSES: THE RUNTIME THE GUIDE TAKES FOR GRANTED
 * ==========================================================================
 * (agents.md asks the reader to know the Getting Started guide's
 * "Processes" chapter: spawn, send, receive, links.  This Part builds them.)
 *
 * III.1  The machine in pictures
 * ------------------------------
 *
 * Everything below runs on one operating-system thread.  Processes take
 * turns: a process runs until it waits for a message (receive) or gives up
 * its turn, and then another one runs.  Nobody is interrupted, so there are
 * no locks anywhere in this file.  (BEAM interrupts a process after a budget
 * of "reductions"; ours are cooperative.  A process that loops forever
 * without receiving keeps the VM to itself.)
 *
 * The process table.  A pid is a number N, printed #PID<0.N.0> as iex does.
 * The table is an array whose size is a power of two; process N lives in
 * slot N mod size.  When a new process is spawned, the VM takes the next
 * number whose slot is free, so finding a process from its pid is one array
 * read and one comparison.  (BEAM's table works the same way.)
 *
 *     vm.table   slot:   0        1        2        3      ...
 *                     +--------+--------+--------+--------+
 *                     | proc 8 |  ----  | proc 2 | proc 3 |
 *                     +---|----+--------+---|----+---|----+
 *                         v                 v        v
 *                     struct proc: pid, state, mailbox, heap, links,
 *                     monitors, saved stack, jmp_buf, ...
 *
 * A stack per process, kept as a saved copy.  A C function's local
 * variables live on the C stack, so a process that stops in the middle of
 * a call chain (waiting in receive, five calls deep) needs its stack kept
 * somewhere while others run.  Coroutine libraries give every coroutine its
 * own stack region and switch the stack pointer between them.  kv.c does
 * something simpler and cheaper in memory: every process runs on the same
 * stretch of the ordinary C stack, called "the stage", and when a process
 * steps off the stage the bytes it was using are copied into a buffer of
 * its own.  When it steps back on, they are copied back to the very same
 * addresses, so every pointer into its stack is valid again.
 *
 *     high addresses
 *     +--------------------------+
 *     | main(), vm_run()         |  the scheduler's frames
 *     |  ...the gap (64 KiB)...  |  room for the scheduler's own calls
 *     +--------------------------+  <- vm.stage_top
 *     | stage_land(P)            |  how P first came on stage (never
 *     |..........................|  returned to, so never saved)
 *     | proc_main(P)             |  <- P's top; below it, P's frames,
 *     | gen_server_loop(...)     |  exactly as the compiler laid them out
 *     | receive(...)             |
 *     | proc_wait()              |  <- its stack pointer when it stopped
 *     +--------------------------+
 *     |   (rest of the C stack)  |  a deep call chain simply keeps going;
 *     v                          v  no other process's bytes live here
 *
 *     P's saved copy, p->stack, a malloc'd buffer of its own:
 *                       [ bytes from its stack pointer up to its top ]
 *                       typically 150 to 700 bytes
 *
 * Why this way?  An idle process costs only the bytes it was really using
 * (BEAM's idle process costs about 2.7 KB; ours about a third of that),
 * there is no memory map per process and so no limit near 32,000
 * processes (a guard page per stack costs two kernel mappings, and Linux
 * allows 65,530), and no assembly is needed anywhere: entering the stage
 * is an ordinary call, leaving it is _longjmp.  The price is the copy: a
 * switch moves a few hundred bytes each way (the last stage's ./kv bench
 * measures it).  A
 * process that overflows the C stack cannot trample another process
 * either, because no other process's stack is on the C stack: the
 * kernel's guard page stops it and the VM names the culprit (section III.3).
 *
 * What a jmp_buf holds.  _setjmp(buf) saves the registers a C function
 * must preserve across calls: the stack pointer, the frame pointer, the
 * callee-saved registers (rbx, r12-r15 on x86-64; x19-x29 on aarch64) and
 * the address to continue at.  _longjmp(buf, v) loads them back, so the
 * program continues as if that _setjmp had just returned v.  It does not
 * restore memory: the stack bytes the registers point at must still be
 * there, which is exactly what copying the saved stack back guarantees.
 * Three kinds of jmp_buf exist here:
 *
 *     vm.sched_ctx    in the scheduler's frame, above the stage: every
 *                     jump to it goes upward, to an older frame, as C allows.
 *                     It stays valid however many times processes hand the
 *                     CPU to one another directly, because all of them run
 *                     below the scheduler's frame, which is still live
 *     proc->ctx       where a waiting process continues; valid only while
 *                     its saved bytes are back on the stage
 *     catch->env      a catch point inside one process (exit from any
 *                     depth); dead once the try_catch call that set it has
 *                     returned, which is why it is unlinked on the way out
 *
 * Every _longjmp in this file goes to a frame above the current one, which
 * is also why glibc's _FORTIFY_SOURCE check (it aborts a longjmp that goes
 * *down* the stack) never fires.
 *
 * Why _setjmp and not setjmp?  POSIX's setjmp may also save the signal
 * mask, which costs a system call on every switch; _setjmp never does,
 * and kv.c changes no signal mask while processes run.  And C's one rule
 * about locals: a local variable of the function that called _setjmp,
 * changed after the _setjmp and before the _longjmp back, holds an
 * undefined value afterwards unless it is volatile (it may have lived in
 * a register that the jump restored).  Each contract comment below says
 * why its locals are safe: usually, nothing is changed in between.
 *
 * The mailbox.  Messages are copied when sent (processes share nothing)
 * into a block of memory of their own and queued in arrival order:
 *
 *     proc->mbox_head -> [msg 1] -> [msg 2] -> [msg 3] -> NULL
 *                                                 ^
 *     proc->mbox_tail -------------------- &msg3->next
 *
 * receive walks the queue from the oldest message, asks a match function
 * about each one, and takes the first that matches; the others stay where
 * they were, in order (selective receive).  A received message's memory
 * joins the receiver's heap.
 *
 * Terms and heaps.  Each process builds its terms (Part I) in a heap of
 * its own, which is freed all at once when the process dies, however it
 * dies.  Long-lived servers compact their heap after a callback by copying
 * the state into a fresh heap, the same idea as BEAM's per-process garbage
 * collector, with one root.
 *
 * What is in this Part: the process table and the states of a process
 * (III.2); the stage, where processes take turns on the C stack (III.3);
 * the scheduler, its timers and its clock (III.4); messages (III.5);
 * links, monitors and exit signals (III.6); the Process module (III.7);
 * exits and catch points (III.8); exceptions and the Logger (III.9); and
 * modules, as apply/3 finds them (III.10).
 */

/* --------------------------------------------------------------------------
 * III.2  Processes and the process table
 * --------------------------------------------------------------------------
 * A process is a struct proc.  Its life, in states:
 *
 *          spawn
 *            |
 *            v             its turn comes
 *        RUNNABLE ---------------------------> RUNNING
 *          ^    ^----- erlang_yield -----------   |   |
 *          |                                      |   |  it returns, calls
 *   a message, its      receive finds nothing     |   |  exit/1, or handles
 *   timer, or input     to take: proc_wait        |   |  a killing signal
 *        WAITING <--------------------------------+   |
 *           |                                         v
 *           +---- :kill, or a signal it handles --> EXITING
 *
 *     EXITING: proc_finish tells its links and monitors, and frees it all.
 *
 * RUNNING is the one process on the CPU: vm.current.  Only it can change
 * its own stack; everything the others may touch (mailbox, links,
 * monitors, heap, state) is in its struct proc, in malloc'd memory that
 * stays put while the process is off the stage.
 */

/* Part III's atoms: the runtime's own, and the exceptions it raises (I.3 says how atoms are declared). */
#define RUNTIME_ATOMS(X) X(ok, "ok") X(error, "error") X(normal, "normal") X(kill, "kill") \
    X(killed, "killed") X(shutdown, "shutdown") X(noproc, "noproc") X(EXIT, "EXIT") X(DOWN, "DOWN") \
    X(process, "process") X(infinity, "infinity") X(undefined, "undefined") \
    X(timeout_value, "timeout_value") X(nonode, "nonode@nohost") X(message, "message") \
    X(term, "term") X(module, "module") X(function, "function") X(arity, "arity") X(kind, "kind") \
    X(clauses, "clauses") X(original, "original") X(reason, "reason") \
    X(RuntimeError, "Elixir.RuntimeError") X(ArgumentError, "Elixir.ArgumentError") \
    X(MatchError, "Elixir.MatchError") X(FunctionClauseError, "Elixir.FunctionClauseError") \
    X(ErlangError, "Elixir.ErlangError") X(UndefinedFunctionError, "Elixir.UndefinedFunctionError") \
    X(get, "get") X(args, "args") X(nocatch, "nocatch") X(init, "init")
DECLARE_ATOMS(RUNTIME_ATOMS)

enum pstate {
    P_RUNNABLE, /* in the run queue, waiting for its turn */
    P_RUNNING,  /* on the stage, executing */
    P_WAITING,  /* in receive (or sleeping), off the run queue */
    P_EXITING   /* dead or about to be: no longer alive? */
};

/* A message: its own chunk of memory, starting with this header, followed
 * by the copied term.  Received, the whole chunk joins the receiver's heap.
 * An exit signal waits in the same queue, in order with the messages, as
 * {:EXIT, from, reason} with `signal` set, until the process handles it
 * (section III.6). */
struct msg {
    struct msg *next;
    term value;
    struct chunk *chunk;
    bool signal;
};

/* A link has two ends, one in each process's list; each end knows its twin,
 * so either process can remove the link in O(1). */
struct link_end {
    struct link_end *prev, *next;
    struct proc *peer;
    struct link_end *twin;
};

/* A monitor sits in two lists: the watcher's `monitors` and the target's
 * `watchers`. */
struct monitor {
    uint64_t ref;
    struct proc *watcher, *target;
    struct monitor *w_prev, *w_next, *t_prev, *t_next;
    term name;  /* monitored by name: the DOWN message names {name, node} */
    bool alias; /* GenServer.call's reply alias: see process_send_alias */
};

/* A catch point inside a process: try ... catch kind, reason -> ... end. */
struct catch_frame {
    jmp_buf env;
    struct catch_frame *prev;
    bool in_receive; /* was the process inside receive when it was set? */
};

enum caught { CAUGHT_NOTHING, CAUGHT_EXIT, CAUGHT_ERROR, CAUGHT_THROW };

/* A million of these may be alive at once, so the small fields come
 * first, packed: counts as 32-bit numbers (a mailbox, a saved stack and
 * the timer heap are never 4 GiB long). */
struct proc {
    uint64_t pid;            /* N in #PID<0.N.0> */
    enum pstate state;
    enum caught caught;      /* what the last throw to it carried */
    int wait_fd;             /* waiting for input on this fd; -1: none */
    bool started;            /* has run at least once (has a saved stack) */
    bool trap_exit;          /* Process.flag(:trap_exit, true) */
    bool timed_out;          /* its receive's `after` fired */
    bool in_receive;         /* inside receive_full (its timer is receive's) */
    bool queued;             /* in the run queue */
    uint32_t mbox_len;       /* messages in its mailbox, */
    uint32_t mbox_signals;   /* ...how many of them exit signals (receive_mark) */
    uint32_t timer_slot;     /* 1 + index in the timer heap; 0: none */
    uint32_t stack_len, stack_cap; /* its saved stack's length, and room */
    uint32_t stack_gap;      /* its stack's top is this far below vm.stage_top */

    const char *label;       /* what it runs, e.g. "KV.Registry", for reports */
    struct heap heap;        /* every term it built or received */

    /* The saved stack: the bytes from its stack pointer up to its top
     * (stack_top, just below vm.stage_top), copied out when it stopped
     * (section III.3). */
    char *stack;
    jmp_buf ctx;             /* where it continues; valid with its bytes on stage */

    struct msg *mbox_head, **mbox_tail; /* the mailbox, oldest first */

    const char *waiting_for; /* for deadlock reports: what receive waits for */
    term waiting_on;         /* ...and from whom, or NULL */
    int64_t deadline;        /* receive's `after`, in VM milliseconds */

    struct link_end *links;
    struct monitor *monitors; /* processes it monitors */
    struct monitor *watchers; /* monitors on it */
    term name;                /* registered name (an atom) or NULL */

    struct catch_frame *catcher; /* innermost catch point, or NULL */
    term caught_reason;

#ifdef KV_ASAN
    void *fake_stack;         /* ASan's fake stack for it (see FIBER_LEAVE) */
#endif
    void (*entry)(term arg);  /* the function it runs; returning = :normal */
    term arg;
    term exit_reason;         /* set when it starts dying */
    struct proc *run_next, *run_prev; /* run queue */
    struct proc *dying_next;  /* queue of processes to finish */
};

/* Timeouts.  Where a user can write one (receive's `after`, GenServer.call,
 * Process.sleep, a callback's result) it is a term, :infinity or a number
 * of milliseconds, checked as Elixir checks it.  Inside the VM it is an
 * int64_t, with NO_TIMEOUT for :infinity. */
#define NO_TIMEOUT INT64_MAX
#define AFTER_MAX INT64_C(4294967295) /* the longest `after` BEAM accepts, ~49.7 days */

enum vm_result { VM_DONE, VM_IDLE, VM_DEADLOCK };
enum jump { JUMP_SWITCHED = 1, JUMP_EXITED }; /* what _setjmp(vm.sched_ctx) returns */

static struct vm {
    /* The process table: process N lives in table[N & (cap - 1)]. */
    struct proc **table;
    size_t table_cap, count, limit;
    uint64_t next_pid, next_ref;

    struct proc *current;             /* on the CPU, or NULL: the scheduler */
    struct proc *run_head, *run_tail; /* runnable, in order */
    struct proc *dying_head, *dying_tail;
    struct proc *exiting;             /* the process that just exited */

    /* The stage (III.3). */
    jmp_buf sched_ctx;   /* in sched_enter's frame: where processes jump back to */
    bool in_run;         /* vm_run is on the C stack */
    uintptr_t stage_top; /* every process's stack starts just below this */
    uintptr_t stack_end; /* the lowest address the C stack may reach */
    size_t stack_size;   /* ...and the C stack's size */
    void *sched_fake_stack; /* ASan's fake stack for the scheduler */
    unsigned direct;     /* switches since the scheduler last looked around */
    uint64_t switches;

    /* Time (III.4). */
    bool virtual_clock;
    int64_t virtual_now;
    struct timespec epoch;
    struct proc **timers; /* min-heap on deadline */
    size_t ntimers, timers_cap;
    size_t fd_waiters;

    /* Registered names (III.7): a short array of (name, process). */
    struct { term name; struct proc *proc; } *names;
    size_t nnames, names_cap;

    /* Where the VM's own reports and the Logger write; stderr by default. */
    void (*out)(const char *text, size_t len);
    /* Called as each process is finished, with its exit reason (the
     * self-test uses it to learn how a test process ended). */
    void (*on_finish)(uint64_t pid, term reason);
    /* Called as the running process is about to wait (the self-test uses
     * it to kill a process at each of its waits in turn). */
    void (*on_wait)(struct proc *p);
} vm;

/* ---- Declared ahead ------------------------------------------------------
 * The runtime's sections call one another both ways: a process's first
 * frame (III.3) handles exit signals (III.6), sending (III.5) raises
 * exceptions (III.9), finishing a process (III.6) forgets its names (III.7).
 * The functions used before the section that defines them are declared
 * here, once, each with its section. */
struct module;
enum signal_outcome { SIGNAL_KEPT_AS_MESSAGE, SIGNAL_TAKEN };
static NORETURN void proc_main(struct proc *p);                         /* III.3 */
static void handle_signals(struct proc *p);                             /* III.6 */
static enum signal_outcome handle_exit_signal(struct proc *p, struct msg **at);
static void exit_later(struct proc *p, term reason);
static void proc_finish(struct proc *p);
static void finish_exited(void);
static void apply_exits(void);
static void monitor_pool_drain(void);
static struct proc *whereis_proc(term name);                            /* III.7 */
static void names_remove(struct proc *p);
static NORETURN void raise_error(term exception);                       /* III.8 */
static term exception_new(term module, size_t nfields, ...);            /* III.9 */
static term erlang_error(term original);
API term function_clause_error(term module, term function, int arity);
static NORETURN void raise_argument_error(const char *message, ...);
static void log_raised(term exception);
static const struct module *code_find(term name);                       /* III.10 */
static void code_purge(void);
static term undefined_function_error(term module, term function, int arity);

static void out_stderr(const char *text, size_t len) {
    fwrite(text, 1, len, stderr);
    fflush(stderr);
}

/* The process with this pid number, alive or dying, or NULL: one array
 * read, and a check that the slot holds that pid and not another whose
 * number falls in the same slot. */
static struct proc *proc_of_pid(uint64_t pid) {
    if (!vm.table || pid == 0) return NULL;
    struct proc *p = vm.table[pid & (vm.table_cap - 1)];
    return p && p->pid == pid ? p : NULL;
}

/* A live process from a pid term, or NULL. */
static struct proc *proc_of(term pid) {
    if (!is_pid(pid)) return NULL;
    struct proc *p = proc_of_pid(pid->u.id);
    return p && p->state != P_EXITING ? p : NULL;
}

/* Double the table (it is kept at most half full, so that new numbers find
 * a free slot quickly) and move every process to its slot in the new one. */
static void table_grow(void) {
    size_t cap = vm.table_cap ? vm.table_cap * 2 : 1024;
    struct proc **table = vm_realloc(NULL, cap * sizeof *table);
    memset(table, 0, cap * sizeof *table);
    /* Two live pids that differed modulo the old size differ modulo the
     * new one, so every process finds an empty slot. */
    for (size_t i = 0; i < vm.table_cap; i++)
        if (vm.table[i]) table[vm.table[i]->pid & (cap - 1)] = vm.table[i];
    vm_free(vm.table);
    vm.table = table;
    vm.table_cap = cap;
}

/* Give p the next pid whose slot is free. */
static void table_insert(struct proc *p) {
    if (vm.count + 1 > vm.table_cap / 2) table_grow();
    for (;;) {
        uint64_t n = vm.next_pid++;
        struct proc **slot = &vm.table[n & (vm.table_cap - 1)];
        if (!*slot) {
            *slot = p;
            p->pid = n;
            vm.count++;
            return;
        }
    }
}

/* Free p's slot; its number is never given out again (numbers only grow). */
static void table_remove(struct proc *p) {
    vm.table[p->pid & (vm.table_cap - 1)] = NULL;
    vm.count--;
}

/* ---- The run queue ------------------------------------------------------
 * The processes that can run, in the order they became runnable: a doubly
 * linked list through the processes themselves, so that a process killed
 * while it waits its turn leaves the queue in constant time. */

/* p may run: to the back of the queue (a no-op if it is queued already). */
static void runq_push(struct proc *p) {
    if (p->queued) return;
    p->queued = true;
    p->state = P_RUNNABLE;
    p->run_next = NULL;
    p->run_prev = vm.run_tail;
    if (vm.run_tail) vm.run_tail->run_next = p; else vm.run_head = p;
    vm.run_tail = p;
}

static void runq_remove(struct proc *p) {
    if (!p->queued) return;
    if (p->run_prev) p->run_prev->run_next = p->run_next; else vm.run_head = p->run_next;
    if (p->run_next) p->run_next->run_prev = p->run_prev; else vm.run_tail = p->run_prev;
    p->queued = false;
}

/* The process whose turn it is, taken off the queue; NULL if none. */
static struct proc *runq_pop(void) {
    struct proc *p = vm.run_head;
    if (p) runq_remove(p);
    return p;
}

/* --------------------------------------------------------------------------
 * III.3  The stage: switching processes with _setjmp and _longjmp
 * --------------------------------------------------------------------------
 * Four small functions do all the switching:
 *
 *   stack_save(p)     the running process copies its own stack bytes, from
 *                     its stack pointer up to vm.stage_top, into p->stack
 *   stage_enter(p)    moves the stack pointer below where p's bytes go
 *                     (a variable-length array does that, in plain C) and
 *                     calls stage_land(p)
 *   stage_land(p)     copies p's bytes back to their addresses and
 *                     _longjmps into p; a process that never ran is
 *                     instead called: proc_main(p)
 *   proc_wait()       the running process stops: _setjmp, stack_save, and
 *                     either stage_enter(the next runnable process) directly
 *                     or _longjmp to the scheduler
 *
 *     process A, in proc_wait          stage_enter(B)        stage_land(B)
 *     +--------------------+          +--------------+      +-------------+
 *     | _setjmp(A->ctx)    | -------> | char pad[n]; | ---> | memcpy(B's  |
 *     | stack_save(A)      |          | (SP drops    |      |  bytes)     |
 *     +--------------------+          |  below B's   |      | _longjmp(   |
 *                                     |  bytes)      |      |  B->ctx)    |
 *                                     +--------------+      +------|------+
 *                                                                  v
 *                                        B continues in its proc_wait, as
 *                                        if its _setjmp had returned 1
 *
 * Because stage_land runs *below* the bytes it writes, it never overwrites
 * its own frame, and its _longjmp goes up the stack, to B's older frame.
 */

/* ---- AddressSanitizer ------------------------------------------------
 * (Only for builds with -fsanitize=address; a first reading may skip it.)
 */
/* AddressSanitizer support; every macro here is nothing in a normal build.
 * ASan keeps "poison" marks for stack frames, and copying a saved stack in
 * and out moves bytes it believes belong to dead or foreign frames, so the
 * stage is unpoisoned before each copy (UNPOISON).  With ASan's
 * detect_stack_use_after_return, local variables live on a "fake stack" in
 * the heap instead; each process then needs a fake stack of its own, and
 * ASan's fiber calls switch them as processes switch (FIBER_LEAVE before
 * control leaves a process or the scheduler, FIBER_ARRIVE when it arrives).
 * Every "fiber" here is the same C stack, the thread's own, so each switch
 * names the thread's whole stack as ASan knows it: a smaller range would
 * hide the frames of main() and its callers from LeakSanitizer, which
 * would then call whatever only they point to a leak.  ASan has no call
 * that gives those bounds, but a switch reports the stack it came from,
 * so asan_learn_stack switches once to a stand-in range and straight back.
 * NO_ASAN keeps a function's locals on the real stack. */
#ifdef KV_ASAN
void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old);
static const void *asan_stack_bottom; /* the thread's stack, as ASan knows it */
static size_t asan_stack_size;
static void asan_learn_stack(const void *stand_in, size_t size) {
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, stand_in, size);
    __sanitizer_finish_switch_fiber(fake, &asan_stack_bottom, &asan_stack_size);
    __sanitizer_start_switch_fiber(&fake, asan_stack_bottom, asan_stack_size);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
}
#define UNPOISON(addr, size) __asan_unpoison_memory_region((addr), (size))
#define ASAN_WINDOW 16384 /* bytes below the scheduler's frame kept clear */
#define ASAN_LEARN_STACK() asan_learn_stack((const void *)vm.stack_end, vm.stack_size)
#define FIBER_LEAVE(save) __sanitizer_start_switch_fiber((save), asan_stack_bottom, asan_stack_size)
#define FIBER_ARRIVE(save) __sanitizer_finish_switch_fiber((save), NULL, NULL)
#define NO_ASAN __attribute__((no_sanitize_address))
#else
#define UNPOISON(addr, size) ((void)0)
#define ASAN_WINDOW 0
#define ASAN_LEARN_STACK() ((void)0)
#define FIBER_LEAVE(save) ((void)0)
#define FIBER_ARRIVE(save) ((void)0)
#define NO_ASAN
#endif

#define STAGE_GAP (64 * 1024) /* between main()'s frame and the stage */
#define STAGE_SLACK 128       /* extra room stage_enter leaves below */

/* Roughly the current stack pointer: the address of a local in a fresh
 * frame below the caller's. */
static NOINLINE NO_ASAN uintptr_t stack_address(void) {
    volatile char here = 0;
    uintptr_t a = (uintptr_t)&here;
    return a;
}

/* Where p's stack begins: everything p uses lies below it (set when p
 * first comes on stage, in stage_land). */
static uintptr_t stack_top(const struct proc *p) { return vm.stage_top - p->stack_gap; }

/* Contract: called by the running process p, on the stage, just after
 * _setjmp(p->ctx), with `lo` from a stack_address() call in that same
 * caller: just below the caller's frame, and so below the stack pointer
 * _longjmp will restore.  Copies [lo, p's top) to p->stack.  This
 * function's own frame lies below lo: it is not copied, for nothing will
 * need it. */
static NOINLINE void stack_save(struct proc *p, uintptr_t lo) {
    size_t len = stack_top(p) - lo;
    if (len > p->stack_cap) {
        size_t cap = (len + 15) & ~(size_t)15;
        p->stack = mem_realloc(p->stack, p->stack_cap, cap);
        p->stack_cap = (uint32_t)cap;
    }
    UNPOISON((void *)lo, len);
    memcpy(p->stack, (const void *)lo, len);
    p->stack_len = (uint32_t)len;
}

/* Contract: called with the stack pointer below p's top - p's saved
 * length (stage_enter made sure of it).  Live stack after it: p's.  Valid
 * jmp_buf: p->ctx, whose frame is exactly what the memcpy put back.
 * Nothing of the caller is used again: stage_enter's frame is never
 * returned to (when the caller was a process, it was even overwritten).
 *
 * A new process starts here, in proc_main, just below this frame; its
 * top is the start of stage_enter's array, which lies above this frame
 * (and, rounded down to 16 bytes, still above it: the stack pointer is
 * kept 16-aligned), so the only bytes above its frames never saved are
 * this frame's own, which nothing returns to.  (The array ends a little
 * below vm.stage_top: stage_enter aims STAGE_SLACK below it, and the
 * array starts a little above where it aimed, by stage_enter's own
 * frame.) */
static NORETURN NOINLINE void stage_land(struct proc *p, volatile char *pad) {
    vm.current = p;
    p->state = P_RUNNING;
    alloc_heap = &p->heap;
    vm.switches++;
    if (!p->started) {
        uintptr_t top = (uintptr_t)pad & ~(uintptr_t)15;
        if (stack_address() >= top || top > vm.stage_top) abort(); /* cannot happen */
        p->stack_gap = (uint32_t)(vm.stage_top - top);
        p->started = true;
        FIBER_ARRIVE(NULL); /* a new process: ASan gives it a new fake stack */
        proc_main(p);       /* a new process starts here and never returns */
    }
    char *dest = (char *)(stack_top(p) - p->stack_len);
    if (stack_address() >= (uintptr_t)dest) abort(); /* cannot happen */
    UNPOISON(dest, p->stack_len);
    memcpy(dest, p->stack, p->stack_len);
    _longjmp(p->ctx, 1);
}

/* Step p onto the stage.  The variable-length array moves this frame's
 * stack pointer down past the region p's bytes will occupy, so stage_land
 * (called below it) can write that region freely. */
static NORETURN NOINLINE void stage_enter(struct proc *p) {
    uintptr_t sp = stack_address();
    uintptr_t floor = (p->started ? stack_top(p) - p->stack_len : vm.stage_top) - STAGE_SLACK;
    size_t drop = sp > floor ? sp - floor : 16;
    volatile char pad[drop];
    pad[0] = 0;
    stage_land(p, pad);
}

/* The running process stops until something makes it runnable again: a
 * message, its timer, input, or its turn after a yield.
 *
 * Contract: _setjmp returns 0 now, with p on the stage.  We save the stack
 * and hand the CPU over.  Later, stage_land puts p's bytes back and
 * _longjmps here: _setjmp returns 1, every local of every caller is as it
 * was, and vm.current is p again.  `p` itself is not modified after the
 * _setjmp, so it needs no volatile. */
static void proc_wait(void) {
    struct proc *p = vm.current;
    if (vm.on_wait) vm.on_wait(p);
    if (_setjmp(p->ctx) == 0) {
        /* First return (0): we are leaving.  Once stack_save has copied
         * our bytes out, this frame is scratch: a write to it would be
         * lost, and on a direct hand-off stage_land overwrites it with
         * the next process's bytes. */
        stack_save(p, stack_address());
        FIBER_LEAVE(&p->fake_stack);
        /* Hand over directly to the next process if it has run before.
         * A new process should start from the top of the stage (deeper
         * down, the dead frames above it would ride along in every copy
         * of its stack), and every 64th switch goes through the scheduler
         * so it can look at the clock and at input; both cases jump to
         * the scheduler. */
        struct proc *next = vm.run_head;
        if (next && next->started && ++vm.direct < 64) {
            runq_pop();
            stage_enter(next);
        }
        _longjmp(vm.sched_ctx, JUMP_SWITCHED); /* up: sched_enter's frame */
    }
    /* Second return (1): stage_land copied our bytes back and jumped
     * here; every caller's locals are as we left them. */
    FIBER_ARRIVE(p->fake_stack);
}

/* The running process p is finished for good: give the CPU to the
 * scheduler, which frees it (proc_finish).
 * Contract: vm.sched_ctx is valid (see III.1); p's stack is not saved and
 * never entered again. */
static NORETURN void leave_for_good(struct proc *p) {
    vm.exiting = p;
    FIBER_LEAVE(NULL); /* for good: ASan may drop its fake stack */
    _longjmp(vm.sched_ctx, JUMP_EXITED); /* up: sched_enter's frame */
}

/* Kernel.exit from the process itself, for real (no catch). */
static NORETURN void exit_now(term reason) {
    struct proc *p = vm.current;
    p->exit_reason = reason;
    p->state = P_EXITING;
    leave_for_good(p);
}

/* A process's first frame.  Returning from its function means :normal. */
static NORETURN void proc_main(struct proc *p) {
    handle_signals(p); /* a signal may have come before its first turn */
    apply_exits();
    p->entry(p->arg);
    handle_signals(p); /* ...or while it ran without receiving */
    apply_exits();
    exit_now(am_normal);
}

/* ---- Overflow -----------------------------------------------------------
 * A process whose calls go too deep runs off the end of the C stack and
 * hits the kernel's guard page: SIGSEGV.  The handler runs on a stack of
 * its own (sigaltstack, since the normal one is used up), names the process
 * and stops the VM.  Nothing else can be hurt: the other processes' stacks
 * are saved copies in the heap.  Why stop instead of killing just that
 * process?  The overflow may have happened inside malloc or stdio, half-way
 * through an update of memory every process shares; continuing would risk
 * exactly the silent corruption this design avoids. */

static char altstack[64 * 1024];

#define UNLIMITED_STACK_CAP ((size_t)8 << 20)
#define OVERFLOW_REACH ((uintptr_t)1 << 30) /* faults this far below the stage are overflows */

static void overflow_handler(int sig, siginfo_t *info, void *ucontext) {
    (void)ucontext;
    char msg[256];
    uintptr_t addr = (uintptr_t)info->si_addr;
    /* Below the stage, and not absurdly far: the guard page at the end of
     * the stack, or past it, where one giant frame (a huge local array)
     * jumped over the guard and landed in unmapped memory. */
    bool stack = vm.stack_end && addr < vm.stage_top && vm.stage_top - addr <= OVERFLOW_REACH;
    struct proc *p = vm.current;
    int n;
    if (p && stack)
        n = snprintf(msg, sizeof msg,
                     "kv: process #PID<0.%" PRIu64 ".0>%s%s overflowed the C stack "
                     "(%zu KiB deep); stopping the VM\n",
                     p->pid, p->label ? " " : "", p->label ? p->label : "",
                     (size_t)(vm.stage_top - addr) / 1024);
    else if (p)
        n = snprintf(msg, sizeof msg, "kv: segmentation fault in process #PID<0.%" PRIu64 ".0>%s%s\n",
                     p->pid, p->label ? " " : "", p->label ? p->label : "");
    else
        n = snprintf(msg, sizeof msg, "kv: segmentation fault in the scheduler\n");
    if (n > 0 && write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1) < 0) n = 0;
    signal(sig, SIG_DFL);
    raise(sig);
}

/* The stack's size.  An unlimited stack (ulimit -s unlimited) has no end
 * at a known place: it grows until it meets some other mapping, where an
 * overflow is a plain segmentation fault, or worse.  So kv.c caps it at
 * the usual 8 MiB: the kernel checks the limit each time the stack grows,
 * and the overflow then stops at a known address and can be named. */
static void overflow_guard_install(void) {
    struct rlimit rl;
    vm.stack_size = UNLIMITED_STACK_CAP;
    if (getrlimit(RLIMIT_STACK, &rl) == 0) {
        if (rl.rlim_cur == RLIM_INFINITY) {
            rl.rlim_cur = UNLIMITED_STACK_CAP;
            if (setrlimit(RLIMIT_STACK, &rl) != 0) rl.rlim_cur = UNLIMITED_STACK_CAP;
        }
        vm.stack_size = (size_t)rl.rlim_cur;
    }
    vm.stack_end = vm.stage_top + STAGE_GAP - vm.stack_size;
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = overflow_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
}

/* --------------------------------------------------------------------------
 * III.4  The scheduler: run queue, timers, the clock, input, deadlock
 * --------------------------------------------------------------------------
 * vm_run() is the scheduler's loop.  It takes the next runnable process and
 * enters it; processes mostly hand the CPU straight to one another, and
 * come back here only when one exits, when a new one must start, or when
 * nothing is runnable.  Then the loop looks at the clock and at input:
 *
 *     timers due?            wake their processes (their receive times out)
 *     input ready?           wake the processes waiting for it
 *     virtual clock?         jump the clock to the next timer and wake it
 *     real clock?            sleep (in poll) until the next timer or input
 *     none of these          deadlock: report who waits for what, return
 *
 * The clock.  Timeouts are milliseconds.  With the real clock they pass as
 * on a wall clock.  With the virtual clock (the self-test and the tour)
 * time stands still while anything can run and, when every process waits,
 * jumps straight to the next deadline: a 5-second GenServer.call timeout is
 * over in microseconds, with exactly the order of events a real wait would
 * give.
 *
 * Fairness.  The run queue is first in, first out: a process that becomes
 * runnable waits behind those that already were.  A process that waits
 * hands the CPU to the head of the queue directly (proc_wait), without
 * passing through vm_run; every 64th such hand-off goes through vm_run
 * anyway, so that a busy system still looks at the clock and at input.
 * Nothing interrupts a running process: one that never waits or yields
 * keeps the CPU.
 */

/* The VM's clock, in milliseconds. */
static int64_t now_ms(void) {
    if (vm.virtual_clock) return vm.virtual_now;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)(t.tv_sec - vm.epoch.tv_sec) * 1000 + (t.tv_nsec - vm.epoch.tv_nsec) / 1000000;
}

/* ---- Timers: a binary min-heap of waiting processes, by deadline --------
 * A process waiting in a receive with an `after` is in vm.timers, a binary
 * heap: an array in which every entry's deadline is no later than those of
 * its two children (entries 2i+1 and 2i+2), so the earliest deadline is
 * always vm.timers[0].  Adding or removing one costs O(log n) swaps.  Each
 * process remembers where it sits (timer_slot, 1-based; 0: not there), so
 * a message that ends its wait can take it out without a search.
 *
 *     vm.timers:  [ 0: P7 @ 100 | 1: P2 @ 150 | 2: P9 @ 400 | 3: P4 @ 160 ]
 *                        \______ children of 0: 1 and 2;  of 1: 3 and 4
 */

static void timer_swap(size_t i, size_t j) {
    struct proc *t = vm.timers[i];
    vm.timers[i] = vm.timers[j];
    vm.timers[j] = t;
    vm.timers[i]->timer_slot = (uint32_t)(i + 1);
    vm.timers[j]->timer_slot = (uint32_t)(j + 1);
}

/* Move entry i up while it is earlier than its parent. */
static void timer_up(size_t i) {
    while (i > 0 && vm.timers[(i - 1) / 2]->deadline > vm.timers[i]->deadline) {
        timer_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

/* Move entry i down while a child is earlier than it. */
static void timer_down(size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < vm.ntimers && vm.timers[l]->deadline < vm.timers[m]->deadline) m = l;
        if (r < vm.ntimers && vm.timers[r]->deadline < vm.timers[m]->deadline) m = r;
        if (m == i) return;
        timer_swap(i, m);
        i = m;
    }
}

/* p waits until `deadline` at the latest (a receive's `after`). */
static void timer_set(struct proc *p, int64_t deadline) {
    if (vm.ntimers == vm.timers_cap) {
        size_t cap = vm.timers_cap ? vm.timers_cap * 2 : 64;
        vm.timers = vm_realloc(vm.timers, cap * sizeof *vm.timers);
        vm.timers_cap = cap;
    }
    p->deadline = deadline;
    vm.timers[vm.ntimers] = p;
    p->timer_slot = (uint32_t)++vm.ntimers;
    timer_up(vm.ntimers - 1);
}

/* p no longer waits for its deadline: move the last entry into its place
 * and let that entry find its level, up or down. */
static void timer_cancel(struct proc *p) {
    if (!p->timer_slot) return;
    size_t i = p->timer_slot - 1;
    p->timer_slot = 0;
    if (i != --vm.ntimers) {
        vm.timers[i] = vm.timers[vm.ntimers];
        vm.timers[i]->timer_slot = (uint32_t)(i + 1);
        timer_up(i);
        timer_down(i);
    }
}

/* Wake every process whose deadline has come.  timed_out tells its
 * receive that it was the clock, not a message, that woke it. */
static void timers_fire(int64_t now) {
    while (vm.ntimers && vm.timers[0]->deadline <= now) {
        struct proc *p = vm.timers[0];
        timer_cancel(p);
        p->timed_out = true;
        runq_push(p);
    }
}

/* ---- Input ---------------------------------------------------------------
 * A process may wait for a file descriptor to become readable (the shell
 * waits on standard input).  The scheduler polls those descriptors when
 * nothing else can run. */

/* poll(2) the descriptors waited on, for up to timeout_ms (-1: no limit,
 * 0: just look), and make their readers runnable.  Whether any woke. */
static bool poll_input(int timeout_ms) {
    size_t cap = vm.fd_waiters;
    if (cap == 0) return false;
    struct pollfd *fds = vm_realloc(NULL, cap * sizeof *fds);
    struct proc **who = vm_realloc(NULL, cap * sizeof *who);
    size_t n = 0;
    for (size_t i = 0; i < vm.table_cap && n < cap; i++) {
        struct proc *p = vm.table[i];
        if (p && p->wait_fd >= 0 && p->state == P_WAITING) {
            fds[n] = (struct pollfd){.fd = p->wait_fd, .events = POLLIN};
            who[n++] = p;
        }
    }
    bool woke = false;
    if (poll(fds, (nfds_t)n, timeout_ms) > 0) {
        for (size_t i = 0; i < n; i++) {
            if (!fds[i].revents) continue;
            who[i]->wait_fd = -1;
            vm.fd_waiters--;
            runq_push(who[i]);
            woke = true;
        }
    }
    vm_free(fds);
    vm_free(who);
    return woke;
}

static void report(const char *text) { vm.out(text, strlen(text)); }

/* Every process waits and nothing can wake one: say who waits for what. */
static void report_deadlock(void) {
    struct buf b = {0};
    buf_printf(&b, "kv: deadlock: all %zu processes wait, and no timer or input "
                   "can wake any of them:\n", vm.count);
    for (size_t i = 0; i < vm.table_cap; i++) {
        struct proc *p = vm.table[i];
        if (!p || p->state != P_WAITING) continue;
        buf_printf(&b, "    #PID<0.%" PRIu64 ".0>", p->pid);
        if (p->name) { buf_puts(&b, " "); inspect_to(&b, p->name); }
        if (p->label) buf_printf(&b, " (%s)", p->label);
        buf_printf(&b, " waits for %s", p->waiting_for ? p->waiting_for : "a message");
        if (p->waiting_on) { buf_puts(&b, " "); inspect_to(&b, p->waiting_on); }
        buf_printf(&b, "; %zu message%s in its mailbox\n", (size_t)p->mbox_len, p->mbox_len == 1 ? "" : "s");
    }
    report(buf_str(&b));
    buf_free(&b);
}

/* Wake whoever is due: timers whose deadline has passed, readers whose
 * input has come.  Cheap: a clock read, and a poll(2) only if someone
 * waits for input.  On the virtual clock nothing is ever due while
 * processes can run, since that clock only moves when all of them wait. */
static void sched_look_around(void) {
    if (vm.ntimers && vm.timers[0]->deadline <= now_ms()) timers_fire(now_ms());
    if (vm.fd_waiters) poll_input(0);
}

/* Nothing is runnable.  Make something runnable if the clock or input can.
 * `may_wait` allows moving the clock forward (virtual) or sleeping until
 * the next timer or input (real).  Returns false if nothing can be woken. */
static bool sched_idle(bool may_wait) {
    int64_t now = now_ms();
    if (vm.ntimers && vm.timers[0]->deadline <= now) {
        timers_fire(now);
        return true;
    }
    if (poll_input(0)) return true;
    if (!may_wait || (vm.ntimers == 0 && vm.fd_waiters == 0)) return false;
    if (vm.virtual_clock && vm.ntimers) {
        vm.virtual_now = vm.timers[0]->deadline; /* time flies */
        timers_fire(vm.virtual_now);
        return true;
    }
    /* Wait for input or the next timer, whichever comes first. */
    int64_t until = vm.ntimers ? vm.timers[0]->deadline - now : -1;
    int wait = until > INT_MAX ? INT_MAX : (int)until;
    if (vm.fd_waiters) {
        poll_input(wait);
    } else {
        struct timespec ts = {(time_t)(until / 1000), (long)(until % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    }
    timers_fire(now_ms());
    return true;
}

/* Enter p and come back when control returns to the scheduler.
 * Contract: _setjmp saves this frame, which lies above the stage, in
 * vm.sched_ctx; it is set afresh for every turn, and stays valid while
 * processes hand the CPU to one another below it.  Every process jumps
 * back here with JUMP_SWITCHED or JUMP_EXITED; then the live stack is the
 * scheduler's again, and vm.current still names the process that last ran
 * until vm_run clears it.  Nothing in this frame changes after _setjmp. */
static NOINLINE int sched_enter(struct proc *p) {
    int why = _setjmp(vm.sched_ctx);
    if (why == 0) {
        /* ASan: stage_enter never returns, so the guard marks ASan put
         * around its `pad` array are never taken off, and they lie just
         * below this frame.  ASan's own code, which runs here before a
         * call that does not return, would trip over them: clear them. */
        UNPOISON((void *)(stack_address() - ASAN_WINDOW), ASAN_WINDOW);
        FIBER_LEAVE(&vm.sched_fake_stack);
        stage_enter(p);
    }
    FIBER_ARRIVE(vm.sched_fake_stack);
    return why;
}

/* Run processes until the process `watch` has exited (watch != 0), or
 * until nothing is runnable (watch == 0: timers are not waited for).
 * Returns VM_DONE, VM_IDLE, or VM_DEADLOCK after reporting one. */
static enum vm_result vm_run(uint64_t watch) {
    if (vm.in_run || stack_address() <= vm.stage_top + 4096) {
        fprintf(stderr, "kv: vm_run must be called from main's level, not from a process\n");
        abort();
    }
    vm.in_run = true;
    enum vm_result result;
    for (;;) {
        /* Processes killed during the last turn (by an exit signal or a
         * :kill) are finished here, where no process is on the stage. */
        finish_exited();
        vm.direct = 0; /* the next 63 hand-offs may skip this loop again */
        if (watch && !proc_of_pid(watch)) { result = VM_DONE; break; }
        /* Busy or not, look at the clock and at input on every pass, so a
         * timer is late by at most 64 hand-offs however much else runs. */
        sched_look_around();
        struct proc *p = runq_pop();
        if (p) {
            /* One turn: p runs, and maybe hands the CPU to others, until
             * one of them jumps back here. */
            int why = sched_enter(p);
            vm.current = NULL;            /* the scheduler runs now, */
            alloc_heap = &outside_heap;   /* and builds terms outside */
            /* The process that jumped back had returned or exited: its
             * own stack is dead, so it can be finished from here. */
            if (why == JUMP_EXITED) proc_finish(vm.exiting);
            continue;
        }
        /* Nobody can run: let the clock or input wake someone. */
        if (sched_idle(watch != 0)) continue;
        if (!watch) { result = VM_IDLE; break; }
        report_deadlock();
        result = VM_DEADLOCK;
        break;
    }
    vm.in_run = false;
    return result;
}

/* Set the VM up.  Call once, from main() or close to it: the stage starts
 * STAGE_GAP bytes below this call's frame. */
static void vm_init(bool virtual_clock) {
    terms_init();
    INIT_ATOMS(RUNTIME_ATOMS);
    vm.limit = 262144; /* BEAM's default process limit (erl +P) */
    vm.next_pid = 1;   /* 0 means "no process" below */
    vm.next_ref = 1;
    vm.virtual_clock = virtual_clock;
    vm.out = out_stderr;
    clock_gettime(CLOCK_MONOTONIC, &vm.epoch);
    vm.stage_top = (stack_address() - STAGE_GAP) & ~(uintptr_t)63;
    overflow_guard_install();
    ASAN_LEARN_STACK();
}

/* erl +P: the most processes that may be alive at once. */
API void vm_set_process_limit(size_t limit) { vm.limit = limit; }

/* System.stop/0 (:init.stop), its last step: every process still alive
 * is finished as if killed, then the VM gives back its own memory (the
 * process table, timers, names, the chunk pool, the atoms and the module
 * list), so that nothing kv.c allocated is left at exit: valgrind can
 * then say so.  From main() only, after vm_run; nothing runs afterwards. */
static void vm_shutdown(void) {
    vm.on_finish = NULL;
    vm.on_wait = NULL;
    for (size_t i = 0; i < vm.table_cap; i++)
        if (vm.table[i]) exit_later(vm.table[i], am_killed);
    finish_exited();
    vm_free(vm.table);
    vm_free(vm.timers);
    vm_free(vm.names);
    monitor_pool_drain();
    code_purge();
    memset(&vm, 0, sizeof vm);
    terms_shutdown();
}

/* --------------------------------------------------------------------------
 * III.5  Messages: send and receive
 * --------------------------------------------------------------------------
 * send copies the message into a chunk of its own and appends it to the
 * receiver's mailbox; if the receiver was waiting, it becomes runnable.
 * The sender carries on: sending never blocks, as on BEAM.
 *
 * receive is where a process waits.  It walks the mailbox from the oldest
 * message, asking the match function about each, and takes the first one
 * the function accepts.  Here a process waits for {:reply, _} with two
 * other messages ahead of it:
 *
 *     mbox_head -> [{:hello, 1}] -> [{:EXIT, pid, :boom} signal] -> NULL
 *                                                                  ^
 *                     scan: how far this receive has looked -------+
 *
 *     1. {:hello, 1} does not match: scan moves past it, it stays.
 *     2. The exit signal is handled where it stands (III.6): a process that
 *        traps exits sees an ordinary message there; any other exits now.
 *     3. Nothing matched: the process waits (proc_wait).  A new message
 *        makes it runnable; it resumes here and tests only what came after
 *        `scan`.  The `after` timeout, if any, is a timer (III.4) that wakes
 *        it with nothing: receive returns NULL.
 *     4. {:reply, 42} arrives: it matches; it is unlinked from the list
 *        and its chunk joins this process's heap.  The others stay, in
 *        their order, for a later receive.
 */

/* ---- Copying a term -------------------------------------------------------
 * Sending a message copies it: processes share nothing.  term_size says
 * how many bytes a copy needs (atoms and [] are shared, never copied),
 * term_copy builds the copy with those bytes in one go.  A large map's
 * nodes are copied as they are, so the copy keeps the tree's shape. */

/* How many items a container holds: a tuple's elements, a small map's
 * keys and values, a large map's root, a map node's four. */
static size_t container_items(term t) {
    if (t->kind == K_MAP) return map_is_tree(t) ? 1 : 2 * (size_t)t->n;
    return t->kind == K_MAPNODE ? 4 : t->n;
}

static size_t term_size(term t) {
    struct walk w;
    walk_init(&w);
    size_t size = 0;
    void *unused;
    do {
        for (;;) { /* t, and along its list spine or fun environment */
            if (t->kind == K_ATOM || t->kind == K_NIL) break;
            if (t->kind == K_BIN) { size += ALIGN8(sizeof(struct term) + t->n + 1); break; }
            if (t->kind == K_FUN) { size += term_bytes(1); t = t->item[0]; continue; }
            if (t->kind == K_CONS) {
                size += term_bytes(2);
                walk_push(&w, t->item[0], NULL);
                t = t->item[1];
                continue;
            }
            if (t->kind == K_TUPLE || t->kind == K_MAP || t->kind == K_MAPNODE) {
                size_t items = container_items(t);
                size += term_bytes(items);
                for (size_t i = 0; i < items; i++) walk_push(&w, t->item[i], NULL);
                break;
            }
            size += term_bytes(0); /* integer, pid, reference */
            break;
        }
    } while (walk_pop(&w, &t, &unused));
    walk_free(&w);
    return size;
}

/* Build a copy of t in alloc_heap.  Each pending piece is a term and the
 * slot its copy must go to: the new term is made, stored in its slot, and
 * its own items are pushed with their slots inside it.  Atoms and [] are
 * shared, never copied. */
static term copy_rec(term t) {
    struct walk w;
    walk_init(&w);
    term result = NIL;
    term *slot = &result;
    for (;;) {
        for (;;) { /* t, and along its list spine or fun environment */
            struct term *c;
            switch ((enum kind)t->kind) {
            case K_ATOM:
            case K_NIL:
                *slot = t;
                break;
            case K_INT:
            case K_PID:
            case K_REF:
                c = term_alloc((enum kind)t->kind, 0, 0);
                c->u = t->u;
                *slot = c;
                break;
            case K_BIN:
                *slot = binary(BYTES(t), t->n);
                break;
            case K_FUN:
                c = term_alloc(K_FUN, 1, 1);
                c->u = t->u;
                *slot = c;
                slot = &c->item[0];
                t = t->item[0];
                continue;
            case K_TUPLE:
            case K_MAP:
            case K_MAPNODE: {
                size_t items = container_items(t);
                c = term_alloc((enum kind)t->kind, t->n, items);
                c->u = t->u; /* a large map's MAP_TREE, a node's height */
                for (size_t i = 0; i < items; i++) {
                    c->item[i] = NIL;
                    walk_push(&w, t->item[i], &c->item[i]);
                }
                *slot = c;
                break;
            }
            case K_CONS:
                c = term_alloc(K_CONS, 0, 2);
                c->item[0] = c->item[1] = NIL;
                *slot = c;
                walk_push(&w, t->item[0], &c->item[0]);
                slot = &c->item[1];
                t = t->item[1];
                continue;
            }
            break;
        }
        void *with;
        if (!walk_pop(&w, &t, &with)) break;
        slot = with;
    }
    walk_free(&w);
    return result;
}

/* Copy t into heap h, in a chunk of exactly the right size. */
static term term_copy(struct heap *h, term t) {
    size_t size = term_size(t);
    if (size == 0) return t;
    heap_add_chunk(h, chunk_new(size));
    struct heap *saved = alloc_heap;
    alloc_heap = h;
    term c = copy_rec(t);
    alloc_heap = saved;
    return c;
}

/* Copy t into a new message, in one chunk sized exactly.
 *
 * Why a chunk of its own?  The message then owns every byte it points
 * to, so it can sit in the mailbox as long as it likes, and when receive
 * takes it the whole chunk simply joins the receiver's heap: a message is
 * copied once, at send, as on BEAM, and never again.  The struct msg
 * itself lives at the start of the same chunk. */
static struct msg *msg_new(term t) {
    size_t head = ALIGN8(sizeof(struct msg));
    struct chunk *c = chunk_new(head + term_size(t));
    struct msg *m = (struct msg *)(void *)c->data;
    c->used = head;
    struct heap h = {c, sizeof *c + c->size, 0, NULL, NULL};
    WITH_HEAP(&h, m->value = copy_rec(t));
    if (h.chunks != c) abort(); /* term_size and copy_rec disagree */
    m->chunk = c;
    m->next = NULL;
    m->signal = false;
    return m;
}

/* Append m to p's mailbox.  mbox_tail points at the link to fill (the
 * last message's `next`, or mbox_head), so appending costs the same
 * however long the mailbox is.  A process that waits for input rather
 * than for a message (wait_fd) is left waiting: exit_signal wakes it. */
static void mailbox_append(struct proc *p, struct msg *m) {
    *p->mbox_tail = m;
    p->mbox_tail = &m->next;
    p->mbox_len++;
    if (m->signal) p->mbox_signals++;
    if (p->state == P_WAITING && p->wait_fd < 0) runq_push(p); /* wake it */
}

/* Take the message *at (at is the link that points to it) out of p's
 * mailbox, and return it. */
static struct msg *mbox_take(struct proc *p, struct msg **at) {
    struct msg *m = *at;
    *at = m->next;
    if (p->mbox_tail == &m->next) p->mbox_tail = at;
    p->mbox_len--;
    return m;
}

/* Deliver a copy of t to p (nothing happens if p is dying). */
static void deliver(struct proc *p, term t) {
    if (p->state == P_EXITING) return;
    mailbox_append(p, msg_new(t));
}

static void mailbox_free(struct proc *p) {
    struct msg *m = p->mbox_head;
    while (m) {
        struct msg *next = m->next;
        chunk_free(m->chunk);
        m = next;
    }
    p->mbox_head = NULL;
    p->mbox_tail = &p->mbox_head;
    p->mbox_len = 0;
    p->mbox_signals = 0;
}

/* What a BIF raises for an argument of the wrong kind, e.g.
 * raise_badarg("1st argument: not a pid"), in Erlang's words. */
#define BADARG_HEAD "errors were found at the given arguments:\n\n"
#define BADARG(what) BADARG_HEAD "  * " what "\n"
#define raise_badarg(what) raise_argument_error(BADARG(what))

/* Process.send/3 (Kernel.send/2): dest is a pid or a registered name.  A
 * dead pid swallows the message silently; an unknown name is an error. */
API term process_send(term dest, term msg) {
    struct proc *p;
    if (is_atom(dest)) {
        p = whereis_proc(dest);
        if (!p) raise_badarg("1st argument: invalid destination");
    } else if (is_pid(dest)) {
        p = proc_of(dest);
    } else {
        raise_badarg("1st argument: invalid destination");
    }
    if (p) deliver(p, msg);
    return msg;
}

typedef bool (*match_fn)(term msg, const void *arg);

/* A receive is over, however it ends: a message, its `after`, or a raise
 * in its match function (throw_to_catcher, III.8, calls this too).  Its
 * timer must go with it, or it would fire later, in the middle of some
 * other receive, and end that one with nothing. */
static void receive_end(struct proc *p) {
    timer_cancel(p);
    p->timed_out = false;
    p->in_receive = false;
    p->waiting_for = NULL;
    p->waiting_on = NULL;
}

/* receive: the oldest message `match` accepts (any, if match is NULL),
 * removed from the mailbox; or NULL when `timeout_ms` passes first
 * (NO_TIMEOUT: never).  `what` and `about` describe the wait for the
 * deadlock report.  Messages that don't match stay, in order.  The walk
 * starts at `scan`: the head of the mailbox, or a mark (receive_mark).
 *
 * `scan` remembers how far the mailbox was searched, so after a wake-up
 * only the new messages are tested (BEAM keeps the same "save pointer").
 * The match function and its argument may point into this process's own
 * stack: only this process ever calls them.
 *
 * Why `scan` stays valid while the process waits: it points at the
 * `next` of a message already tested, and nothing before it is ever taken
 * out meanwhile.  Messages are only removed by their own process, except
 * exit signals, which others may handle (process_alive); and an exit
 * signal never lies before `scan`, because the walk handles each one as
 * soon as it reaches it. */
static term receive_from(struct msg **scan, match_fn match, const void *arg, int64_t timeout_ms,
                         const char *what, term about) {
    struct proc *p = vm.current;
    bool armed = false;
    p->timed_out = false;
    p->in_receive = true;
    for (;;) {
        for (struct msg *m; (m = *scan);) {
            /* An exit signal, reached in order: if it is not kept as a
             * message, it is gone (and may have killed us). */
            if (m->signal && handle_exit_signal(p, scan) == SIGNAL_TAKEN) {
                apply_exits();
                continue;
            }
            if (match && !match(m->value, arg)) {
                scan = &m->next;
                continue;
            }
            mbox_take(p, scan);
            receive_end(p);
            heap_adopt_chunk(&p->heap, m->chunk); /* its memory is ours now */
            return m->value;
        }
        if (timeout_ms == 0 || p->timed_out) break;
        if (!armed && timeout_ms != NO_TIMEOUT) {
            timer_set(p, now_ms() + timeout_ms); /* timeout_ms <= AFTER_MAX: no overflow */
            armed = true;
        }
        p->state = P_WAITING;
        p->waiting_for = what;
        p->waiting_on = about;
        proc_wait();
    }
    receive_end(p);
    return NULL;
}

/* receive, walking the whole mailbox */
static term receive_full(match_fn match, const void *arg, int64_t timeout_ms, const char *what, term about) {
    return receive_from(&vm.current->mbox_head, match, arg, timeout_ms, what, about);
}

/* Where a receive for a reference not made yet may start: after every
 * message in the mailbox now, for none of them can hold that reference.
 * BEAM does the same (the compiler marks the mailbox before make_ref or
 * monitor, and the receive after it starts there), and so a server with a
 * long queue of casts, making a call of its own, finds the reply without
 * walking the queue.  An exit signal must still be handled in its turn,
 * so with one queued the mark is the head.  The mark stays valid while
 * the process waits: nothing before it is ever taken out but signals, and
 * there are none there. */
static struct msg **receive_mark(void) {
    struct proc *p = vm.current;
    return p->mbox_signals ? &p->mbox_head : p->mbox_tail;
}

/* An `after` value: :infinity, or 0 to AFTER_MAX milliseconds; anything
 * else raises, as BEAM's receive does: ErlangError :timeout_value. */
static int64_t after_ms(term timeout) {
    if (timeout == am_infinity) return NO_TIMEOUT;
    if (is_integer(timeout) && int_value(timeout) >= 0 && int_value(timeout) <= AFTER_MAX) return int_value(timeout);
    raise_error(erlang_error(am_timeout_value));
}

/* receive do ... after timeout -> ... end, for a process's own code;
 * timeout is :infinity or milliseconds */
API term receive(match_fn match, const void *arg, term timeout) {
    return receive_full(match, arg, after_ms(timeout), "a message", NULL);
}

//> supervisor-and-application
/* receive with no `after`, for the VM's own waits */
static term receive_forever(match_fn match, const void *arg) {
    return receive_full(match, arg, NO_TIMEOUT, "a message", NULL);
}
//> agents

/* receive ... after 0: a message already there, or NULL at once */
static term receive_now(match_fn match, const void *arg) {
    return receive_full(match, arg, 0, "a message", NULL);
}

static bool match_nothing(term msg, const void *arg) {
    (void)msg, (void)arg;
    return false;
}

/* Process.sleep/1: a receive that accepts nothing, with an `after`.
 * Its guard takes :infinity or an integer >= 0 (FunctionClauseError
 * otherwise); receive then refuses what is longer than AFTER_MAX. */
API void process_sleep(term timeout) {
    if (timeout != am_infinity && !(is_integer(timeout) && int_value(timeout) >= 0))
        raise_error(function_clause_error(alias("Process"), atom("sleep"), 1));
    receive_full(match_nothing, NULL, after_ms(timeout), "the end of Process.sleep", NULL);
}

/* :erlang.yield/0 — let every other runnable process have a turn. */
API void erlang_yield(void) {
    struct proc *p = vm.current;
    runq_push(p);
    proc_wait();
    handle_signals(p); /* exit signals that came meanwhile take effect now */
    apply_exits();
}

/* What a port does for the process that owns it: wait until fd has input
 * (the shell reads standard input this way). */
API void process_wait_input(int fd) {
    struct proc *p = vm.current;
    /* A descriptor that is not open would never become readable, and
     * poll(2) would silently skip it: refuse it here, in the caller. */
    if (fd < 0 || fcntl(fd, F_GETFD) == -1) raise_badarg("1st argument: not an open file descriptor");
    p->wait_fd = fd;
    vm.fd_waiters++;
    while (p->wait_fd >= 0) { /* poll_input clears it when fd is ready */
        p->state = P_WAITING;
        p->waiting_for = "input";
        proc_wait();
        /* Woken by an exit signal, maybe (messages do not wake it). */
        handle_signals(p);
        apply_exits();
    }
    p->waiting_for = NULL;
}

/* --------------------------------------------------------------------------
 * III.6  Links, monitors and exit signals
 * --------------------------------------------------------------------------
 * When a process dies, with reason R, the VM sends an exit signal with R
 * along every link, then a {:DOWN, ref, :process, pid, R} message along
 * every monitor.  An exit signal arriving at a process does what this
 * table says (OTP's table; a "direct" signal is one sent by Process.exit/2):
 *
 *     signal reason        not trapping exits         trapping exits
 *     ----------------     ------------------------   ----------------------
 *     :normal              ignored (but a process     {:EXIT, from, :normal}
 *                          that sends it to itself
 *                          exits)
 *     :kill (direct)       exits with :killed         exits with :killed
 *     anything else        exits with that reason     {:EXIT, from, reason}
 *
 * When does it arrive?  On BEAM, signals from one process to another keep
 * their order with the messages between them, and the receiver handles
 * them when it next runs.  kv.c queues an exit signal in the mailbox, as
 * an {:EXIT, from, reason} entry marked `signal`, and acts on it only
 * when a receive walks past it: a trapping process finds an ordinary
 * message there, any other process exits or ignores it.  The order is
 * kept, so messages that arrived earlier can always be read first: a
 * server that answers and then dies lets its caller read the answer.  On
 * BEAM the caller may also die before reading it, if it handles both
 * signals in one go; kv.c picks one of the orders BEAM allows, and the
 * one that repeats the same way every run.  Two things act at once
 * instead: an untrappable :kill, and a signal a process sends itself.
 *
 * The exit path: who calls what.  However a process ends, proc_finish
 * ends it: it removes its names, sends its exit signals and :DOWN
 * messages, and frees it.  The running process cannot be freed while its
 * own code runs on the stage, so it leaves first, for the scheduler to
 * finish it:
 *
 *   its own end                       a signal from elsewhere
 *   -----------                       -----------------------
 *   its function returns (proc_main)  exit_signal(p, from, reason):
 *   Kernel.exit, uncaught (exit_self) queued in p's mailbox, acted on
 *   a raise, uncaught (raise_error)   when p's receive walks past it
 *          |                          (handle_signals -> handle_exit_signal)
 *          |                          or at once for :kill
 *       exit_now                                 |
 *          |                          exit_later(p, reason): p marked
 *          |                          P_EXITING, queued on vm.dying
 *          |                                     |
 *          |                          apply_exits(), after each runtime
 *          |                          call that may have killed:
 *          |                            finish_exited() -> proc_finish
 *          |                              for each queued p but the
 *          |                              running one; then, if the
 *          |                              running one is marked:
 *          v                                     v
 *        leave_for_good(p): vm.exiting = p, _longjmp to the scheduler,
 *          which calls proc_finish(p)
 *
 * The data.  A link is two `struct link_end`s, one in each process's list,
 * each pointing at the other (its twin); a monitor is one `struct monitor`
 * on two lists, the watcher's `monitors` and the target's `watchers`:
 *
 *     A->links: [end: peer B] <--twin--> [end: peer A] :B->links
 *
 *     W->monitors: [monitor ref 7] ...        (watcher W, target T)
 *                        |
 *     T->watchers:  [the same monitor] ...
 *
 * Either side can remove a link or a monitor in constant time, and a dying
 * process walks its own two lists to tell everyone it is linked to or
 * watched by.
 */

static void link_push(struct proc *owner, struct link_end *e) {
    e->prev = NULL;
    e->next = owner->links;
    if (owner->links) owner->links->prev = e;
    owner->links = e;
}

static void link_unhook(struct proc *owner, struct link_end *e) {
    if (e->prev) e->prev->next = e->next; else owner->links = e->next;
    if (e->next) e->next->prev = e->prev;
}

/* The link between p and q, if any: both lists are walked side by side,
 * so the cost is the length of the shorter one. */
static struct link_end *link_find(struct proc *p, struct proc *q) {
    /* A link has an end in each list, so when either list runs out
     * without finding it, there is none. */
    for (struct link_end *a = p->links, *b = q->links; a && b; a = a->next, b = b->next) {
        if (a->peer == q) return a;
        if (b->peer == p) return b->twin;
    }
    return NULL;
}

/* Process.link is idempotent: linking twice still makes one link, and a
 * process cannot link to itself. */
static void link_add(struct proc *p, struct proc *q) {
    if (p == q || link_find(p, q)) return;
    struct link_end *a = mem_alloc(sizeof *a), *b = mem_alloc(sizeof *b);
    a->peer = q, a->twin = b;
    b->peer = p, b->twin = a;
    link_push(p, a);
    link_push(q, b);
}

/* Remove the link whose end e sits in owner's list. */
static void link_remove(struct proc *owner, struct link_end *e) {
    struct link_end *twin = e->twin;
    link_unhook(owner, e);
    link_unhook(e->peer, twin);
    mem_free(e, sizeof *e);
    mem_free(twin, sizeof *twin);
}

/* Unlike links, monitors are not merged: each Process.monitor call makes
 * a new one, with its own ref, and each will deliver its own :DOWN.
 * `name` is the registered name it was asked for by, or NULL: the :DOWN
 * then names {name, node} instead of the pid. */
/* A monitor comes and goes with every GenServer.call, so a freed one
 * waits in a pool (up to MONITOR_POOL_MAX of them) for the next instead
 * of going back to malloc.  Like a pooled chunk, a pooled monitor belongs
 * to no process: its bytes count as the VM's meanwhile. */
#define MONITOR_POOL_MAX 4096
static struct {
    struct monitor *free; /* linked through w_next */
    size_t n;
} monitor_pool;

static struct monitor *monitor_alloc(void) {
    struct monitor *m = monitor_pool.free;
    if (!m) return mem_alloc(sizeof *m);
    monitor_pool.free = m->w_next;
    monitor_pool.n--;
    vm_in_use -= sizeof *m;
    mem_in_use += sizeof *m;
    return m;
}

static void monitor_release(struct monitor *m) {
    if (monitor_pool.n == MONITOR_POOL_MAX) {
        mem_free(m, sizeof *m);
        return;
    }
    mem_in_use -= sizeof *m;
    vm_in_use += sizeof *m;
    m->w_next = monitor_pool.free;
    monitor_pool.free = m;
    monitor_pool.n++;
}

/* Give the pooled monitors back to malloc (vm_shutdown). */
static void monitor_pool_drain(void) {
    for (struct monitor *m = monitor_pool.free, *next; m; m = next) {
        next = m->w_next;
        vm_in_use -= sizeof *m;
        free(m); /* a process's once (mem_alloc), the pool's now */
    }
    monitor_pool.free = NULL;
    monitor_pool.n = 0;
}

static struct monitor *monitor_add(struct proc *watcher, struct proc *target, term name) {
    struct monitor *m = monitor_alloc();
    m->ref = vm.next_ref++;
    m->watcher = watcher;
    m->target = target;
    m->name = name;
    m->alias = false;
    m->w_prev = NULL;
    m->w_next = watcher->monitors;
    if (watcher->monitors) watcher->monitors->w_prev = m;
    watcher->monitors = m;
    m->t_prev = NULL;
    m->t_next = target->watchers;
    if (target->watchers) target->watchers->t_prev = m;
    target->watchers = m;
    return m;
}

static void monitor_remove(struct monitor *m) {
    if (m->w_prev) m->w_prev->w_next = m->w_next; else m->watcher->monitors = m->w_next;
    if (m->w_next) m->w_next->w_prev = m->w_prev;
    if (m->t_prev) m->t_prev->t_next = m->t_next; else m->target->watchers = m->t_next;
    if (m->t_next) m->t_next->t_prev = m->t_prev;
    monitor_release(m);
}

static struct monitor *monitor_find(struct proc *watcher, uint64_t ref) {
    for (struct monitor *m = watcher->monitors; m; m = m->w_next)
        if (m->ref == ref) return m;
    return NULL;
}

/* Build a message in a scratch heap and deliver a copy of it to p. */
static void deliver_tuple(struct proc *p, size_t n, const term *items) {
    struct heap scratch = {0};
    term t;
    WITH_HEAP(&scratch, t = tuple_of(n, items));
    deliver(p, t);
    heap_free(&scratch);
}

/* {:DOWN, ref, :process, object, reason} to whoever holds monitor m. */
static void send_down(struct proc *watcher, uint64_t ref, term object, term reason) {
    struct heap scratch = {0};
    term r;
    WITH_HEAP(&scratch, r = ref_term(ref));
    term items[5] = {am_DOWN, r, am_process, object, reason};
    deliver_tuple(watcher, 5, items);
    heap_free(&scratch);
}

/* Take p out of everything the scheduler might wake it from: the run
 * queue, the timer heap, the list of input waiters. */
static void wait_cancel(struct proc *p) {
    runq_remove(p);
    timer_cancel(p);
    if (p->wait_fd >= 0) {
        p->wait_fd = -1;
        vm.fd_waiters--;
    }
}

/* p must exit with `reason`: mark it and queue it for finish_exited().  Nothing
 * is freed yet: p may be the running process, deep in a call.  The reason
 * is copied into p's own heap unless p is the one running (then it is
 * already there): it must outlive the heap of whoever sent it. */
static void exit_later(struct proc *p, term reason) {
    if (p->state == P_EXITING) return;
    p->exit_reason = p == vm.current ? reason : term_copy(&p->heap, reason);
    p->state = P_EXITING;
    wait_cancel(p);
    p->dying_next = NULL;
    if (vm.dying_tail) vm.dying_tail->dying_next = p; else vm.dying_head = p;
    vm.dying_tail = p;
}

/* Handle the exit signal *at, an {:EXIT, from, reason} entry in p's
 * mailbox: a trapping process keeps it as an ordinary message (true); for
 * any other process it is taken out, and kills p unless the reason is
 * :normal (false). */
static enum signal_outcome handle_exit_signal(struct proc *p, struct msg **at) {
    struct msg *sig = *at;
    p->mbox_signals--; /* a signal no more, either way */
    if (p->trap_exit) {
        sig->signal = false;
        return SIGNAL_KEPT_AS_MESSAGE;
    }
    mbox_take(p, at);
    term reason = elem(sig->value, 2);
    if (reason != am_normal) {
        heap_adopt_chunk(&p->heap, sig->chunk); /* keep the reason's memory */
        exit_later(p, reason);
    } else {
        chunk_free(sig->chunk);
    }
    return SIGNAL_TAKEN;
}

/* An exit signal from the process `from` to p (see the table above).
 * `link` tells a dying neighbour's signal from Process.exit/2. */
static void exit_signal(struct proc *p, term from, term reason, bool link) {
    if (p->state == P_EXITING) return;
    if (!link && reason == am_kill) {
        exit_later(p, am_killed); /* untrappable, and immediate */
        return;
    }
    term items[3] = {am_EXIT, from, reason};
    struct heap scratch = {0};
    term t;
    WITH_HEAP(&scratch, t = tuple_of(3, items));
    struct msg *sig = msg_new(t);
    heap_free(&scratch);
    sig->signal = true;
    if (from->u.id == p->pid) { /* sent to itself: handled at once */
        struct msg **at = p->mbox_tail;
        mailbox_append(p, sig);
        if (reason == am_normal && !p->trap_exit && !link) {
            p->mbox_signals--;
            chunk_free(mbox_take(p, at)->chunk);
            exit_later(p, am_normal);
        } else {
            handle_exit_signal(p, at);
        }
        return;
    }
    mailbox_append(p, sig);
    if (p->state == P_WAITING) runq_push(p); /* wake it, even from input */
}

/* Handle the exit signals waiting in p's mailbox now, in order: those from
 * the process `from` (0: from anyone).  A process that resumes from a wait
 * other than receive does this for all of its own; Process.alive?/1 does
 * it for the signals its caller sent. */
static void handle_signals_from(struct proc *p, uint64_t from) {
    for (struct msg **pp = &p->mbox_head, *m; (m = *pp) && p->state != P_EXITING;) {
        bool mine = m->signal && (!from || elem(m->value, 1)->u.id == from);
        if (mine && handle_exit_signal(p, pp) == SIGNAL_TAKEN) continue; /* *pp is the next */
        pp = &m->next;
    }
}

static void handle_signals(struct proc *p) { handle_signals_from(p, 0); }

/* Finish a dead process: tell its links and monitors, free everything.
 * Never called for the running process (see finish_exited and vm_run).  The name
 * goes first, as on BEAM, so that a process that hears of the death can
 * register the same name at once (a supervisor restarting a named child
 * relies on it); then the exit signals go along the links, and the :DOWN
 * messages to the monitors. */
static void proc_finish(struct proc *p) {
    term reason = p->exit_reason ? p->exit_reason : am_normal;
    wait_cancel(p); /* nothing of the scheduler's may point at p after this */
    if (vm.on_finish) vm.on_finish(p->pid, reason);
    struct heap scratch = {0};
    term self_pid;
    WITH_HEAP(&scratch, self_pid = pid_term(p->pid));
    names_remove(p);
    while (p->links) {
        struct proc *q = p->links->peer;
        link_remove(p, p->links);
        exit_signal(q, self_pid, reason, true);
    }
    while (p->watchers) {
        struct monitor *m = p->watchers;
        term object = self_pid;
        if (m->name) WITH_HEAP(&scratch, object = tuple(2, m->name, am_nonode));
        send_down(m->watcher, m->ref, object, reason);
        monitor_remove(m);
    }
    while (p->monitors) monitor_remove(p->monitors);
    mailbox_free(p);
    heap_free(&p->heap);
    mem_free(p->stack, p->stack_cap);
    table_remove(p);
    mem_free(p, sizeof *p);
    heap_free(&scratch);
}

static struct proc *dying_pop(void) {
    struct proc *p = vm.dying_head;
    if (!p) return NULL;
    vm.dying_head = p->dying_next;
    if (!vm.dying_head) vm.dying_tail = NULL;
    return p;
}

/* Finish every process marked to exit_later, except the running one. */
static void finish_exited(void) {
    struct proc *p;
    while ((p = dying_pop()))
        if (p != vm.current) proc_finish(p);
}

/* After a runtime call that may have killed processes: finish them, and if
 * the caller itself was killed, leave now (the scheduler finishes it). */
static void apply_exits(void) {
    finish_exited();
    struct proc *self = vm.current;
    if (self && self->state == P_EXITING) leave_for_good(self);
}

/* --------------------------------------------------------------------------
 * III.7  The Process module: spawn, links, monitors, names
 * --------------------------------------------------------------------------
 * The functions processes call.  Each one runs inside the calling process;
 * `vm.current` is the caller. */

/* self/0 */
static term self(void) { return pid_term(vm.current->pid); }

/* Collect the running process's heap, keeping only `root` (and what it
 * refers to): copy root into a fresh heap and free the old one.  Every other
 * term the process held is gone afterwards, so call it only where root is
 * all that is live, as GenServer does between callbacks.  This is BEAM's
 * per-process copying collector with a single root.
 *
 * The copy lands in one chunk, h->old, and the heap remembers the root it
 * kept.  Whatever is allocated afterwards goes in newer chunks, in front
 * of it (a received message's too: heap_adopt_chunk):
 *
 *     chunks -> [young] -> [young] -> [old: the root, as compacted]
 *
 * So if the root is the same term when the heap next fills up (a server
 * whose state a call did not change: a lookup), the young chunks are all
 * garbage, and heap_drop_young frees them without copying anything. */
static term heap_compact(struct heap *h, term root) {
    struct heap fresh = {0};
    root = term_copy(&fresh, root);
    heap_free(h);
    *h = fresh;
    h->live = h->bytes;
    h->old = h->chunks;
    h->old_root = root;
    return root;
}

/* If root is still what the last compaction kept, free every chunk made
 * since (all garbage, by heap_compact's rule) and say so. */
static bool heap_drop_young(struct heap *h, term root) {
    if (!h->old_root || root != h->old_root) return false;
    while (h->chunks != h->old) {
        struct chunk *c = h->chunks;
        h->chunks = c->next;
        h->bytes -= sizeof *c + c->size;
        chunk_free(c);
    }
    return true;
}

/* :erlang.garbage_collect/0, with the one root C cannot find by itself:
 * returns root, copied into the running process's fresh heap (I.4). */
API term garbage_collect(term root) { return heap_compact(&vm.current->heap, root); }

//> dynamic-supervisor/bucket-supervisor
/* Raw memory for the running process, from its own heap: gone when the
 * heap is (the process dies, or compacts its heap).  For a table that C
 * code must keep across a receive, where the process may be killed: a
 * malloc'd one would leak then. */
static void *proc_scratch(size_t size) { return heap_alloc(&vm.current->heap, size ? size : 1); }
//> agents

/* make_ref/0 */
API term make_ref(void) { return ref_term(vm.next_ref++); }

static struct proc *proc_spawn(void (*entry)(term), term arg, const char *label) {
    if (vm.count >= vm.limit) {
        if (!vm.current) {
            fprintf(stderr, "kv: process limit (%zu) reached\n", vm.limit);
            abort();
        }
        raise_error(exception_new(alias("SystemLimitError"), 1, am_message,
                                  string("a system limit has been reached")));
    }
    struct proc *p = mem_alloc(sizeof *p);
    memset(p, 0, sizeof *p);
    p->mbox_tail = &p->mbox_head;
    p->wait_fd = -1;
    p->label = label;
    p->entry = entry;
    table_insert(p);
    p->arg = term_copy(&p->heap, arg); /* the new process shares nothing */
    runq_push(p);
    return p;
}

/* spawn/1: a process running fn(arg).  arg is copied into it, the way an
 * Elixir closure's captured variables are. */
API term spawn(void (*fn)(term), term arg) { return pid_term(proc_spawn(fn, arg, NULL)->pid); }

/* spawn_link/1 */
API term spawn_link(void (*fn)(term), term arg) {
    struct proc *p = proc_spawn(fn, arg, NULL);
    link_add(vm.current, p);
    return pid_term(p->pid);
}

/* spawn_monitor/1 — {pid, ref} */
API term spawn_monitor(void (*fn)(term), term arg) {
    struct proc *p = proc_spawn(fn, arg, NULL);
    struct monitor *m = monitor_add(vm.current, p, NULL);
    return tuple(2, pid_term(p->pid), ref_term(m->ref));
}

/* Start the first process, from main(): the VM's only way in. */
static uint64_t vm_spawn(void (*fn)(term), term arg, const char *label) {
    return proc_spawn(fn, arg, label)->pid;
}

/* Process.alive?/1.  Exit signals already sent to pid are handled first,
 * so a process told to exit by the caller is seen dead, as on BEAM. */
API bool process_alive(term pid) {
    if (!is_pid(pid)) raise_badarg("1st argument: not a pid");
    struct proc *p = proc_of(pid);
    if (!p) return false;
    handle_signals_from(p, vm.current->pid);
    /* Read the answer before apply_exits(): it finishes a process that
     * has just died, and frees it. */
    bool alive = p->state != P_EXITING;
    apply_exits();
    return alive;
}

/* Process.flag(:trap_exit, on) — the previous value */
API bool process_flag_trap_exit(bool on) {
    bool old = vm.current->trap_exit;
    vm.current->trap_exit = on;
    return old;
}

/* Process.link/1.  Linking to a dead process raises :noproc, unless the
 * caller traps exits: then it gets {:EXIT, pid, :noproc}. */
API term process_link(term pid) {
    if (!is_pid(pid)) raise_badarg("1st argument: not a pid");
    struct proc *me = vm.current, *q = proc_of(pid);
    if (q) {
        link_add(me, q);
    } else if (me->trap_exit) {
        term items[3] = {am_EXIT, pid, am_noproc};
        deliver_tuple(me, 3, items);
    } else {
        raise_error(erlang_error(am_noproc));
    }
    return am_true;
}

/* Process.unlink/1 */
API term process_unlink(term pid) {
    if (!is_pid(pid)) raise_badarg("1st argument: not a pid");
    struct proc *q = proc_of(pid);
    struct link_end *e = q ? link_find(vm.current, q) : NULL;
    if (e) link_remove(vm.current, e);
    return am_true;
}

/* Process.exit/2: send an exit signal (see the table in III.6). */
API term process_exit(term pid, term reason) {
    if (!is_pid(pid)) raise_badarg("1st argument: not a pid");
    struct proc *q = proc_of(pid);
    if (q) {
        exit_signal(q, self(), reason, false);
        apply_exits();
    }
    return am_true;
}

/* Process.monitor/1: a pid, or a registered name.  Monitoring something
 * that is not alive gives an immediate {:DOWN, ref, :process, _, :noproc}. */
API term process_monitor(term target) {
    struct proc *me = vm.current, *q;
    term name = NULL;
    if (!is_atom(target) && !is_pid(target)) raise_badarg("2nd argument: not a pid");
    if (is_atom(target)) {
        name = target;
        q = whereis_proc(target);
    } else {
        q = proc_of(target);
    }
    if (!q) {
        uint64_t ref = vm.next_ref++;
        send_down(me, ref, name ? tuple(2, name, am_nonode) : target, am_noproc);
        return ref_term(ref);
    }
    return ref_term(monitor_add(me, q, name)->ref);
}

static bool is_down_for(term msg, uint64_t ref) {
    return is_tagged(msg, am_DOWN, 5) && is_reference(elem(msg, 1)) && elem(msg, 1)->u.id == ref;
}

/* Process.demonitor/2; flush = the [:flush] option: also drop a DOWN
 * message for this monitor that may already be in the mailbox.  A monitor
 * that still exists has sent no DOWN (sending it removes the monitor), so
 * only one already gone needs the mailbox searched: GenServer.call, which
 * demonitors after every reply, never walks a long queue of messages. */
API term process_demonitor(term ref, bool flush) {
    if (!is_reference(ref)) raise_badarg("1st argument: not a reference");
    struct proc *me = vm.current;
    struct monitor *m = monitor_find(me, ref->u.id);
    if (m) monitor_remove(m);
    if (flush && !m) {
        for (struct msg **pp = &me->mbox_head, *msg; (msg = *pp);) {
            if (is_down_for(msg->value, ref->u.id)) chunk_free(mbox_take(me, pp)->chunk);
            else pp = &msg->next;
        }
    }
    return am_true;
}

/* :erlang.monitor(:process, pid, alias: :demonitor), its alias half:
 * turn the monitor `ref` of the running process into a reply alias.  A
 * message sent to the alias arrives only while the monitor exists, which
 * is why GenServer.call uses one: a reply arriving after a timeout is
 * dropped. */
API void monitor_make_alias(term ref) {
    struct monitor *m = monitor_find(vm.current, ref->u.id);
    if (m) m->alias = true;
}

/* send(alias, msg) — to pid, if its reply alias `ref` is still active. */
API void process_send_alias(term pid, term ref, term msg) {
    struct proc *q = proc_of(pid);
    struct monitor *m = q ? monitor_find(q, ref->u.id) : NULL;
    if (m && m->alias) deliver(q, msg);
}

/* ---- Registered names ---- */

static struct proc *whereis_proc(term name) {
    for (size_t i = 0; i < vm.nnames; i++)
        if (vm.names[i].name == name) return vm.names[i].proc;
    return NULL;
}

/* A GenServer's `server` argument: a pid or a registered name.  The live
 * process it means, or NULL. */
static struct proc *server_proc(term server) { return is_atom(server) ? whereis_proc(server) : proc_of(server); }

/* Process.whereis/1 — the pid, or nil */
API term process_whereis(term name) {
    if (!is_atom(name)) raise_badarg("1st argument: not an atom");
    struct proc *p = whereis_proc(name);
    return p ? pid_term(p->pid) : am_nil;
}

static void names_remove(struct proc *p) {
    if (!p->name) return;
    for (size_t i = 0; i < vm.nnames; i++) {
        if (vm.names[i].proc != p) continue;
        vm.names[i] = vm.names[--vm.nnames];
        break;
    }
    p->name = NULL;
}

/* Process.register/2.  A name holds one live process; a process holds one
 * name; both are checked, as on BEAM. */
API term process_register(term pid, term name) {
    /* Elixir's guard: an atom, and not one of those that mean "no name" */
    if (!is_atom(name) || name == am_nil || name == am_true || name == am_false || name == am_undefined)
        raise_error(function_clause_error(alias("Process"), atom("register"), 2));
    struct proc *p = proc_of(pid);
    if (!p || p->name || whereis_proc(name))
        raise_argument_error("could not register %T with name %T because it is not alive, the name is "
                             "already taken, or it has already been given another name", pid, name);
    if (vm.nnames == vm.names_cap) {
        size_t cap = vm.names_cap ? vm.names_cap * 2 : 16;
        vm.names = vm_realloc(vm.names, cap * sizeof *vm.names);
        vm.names_cap = cap;
    }
    vm.names[vm.nnames].name = name;
    vm.names[vm.nnames].proc = p;
    vm.nnames++;
    p->name = name;
    return am_true;
}

/* Process.unregister/1.  (A name nobody holds gets the same words as on
 * Elixir 1.14, whose translation of Erlang's error says "not a pid".) */
API term process_unregister(term name) {
    struct proc *p = is_atom(name) ? whereis_proc(name) : NULL;
    if (!p) raise_badarg("1st argument: not a pid");
    names_remove(p);
    return am_true;
}

//> dynamic-supervisor/observer
/* Process.info/1 — what Observer's process window shows, as far as kv.c
 * knows it: a keyword list (nil for a process that is not alive), with
 * :registered_name only for a registered process, as on BEAM:
 *
 *     [registered_name: KV.Registry, status: :waiting, message_queue_len: 0,
 *      links: [#PID<0.5.0>], monitors: [process: #PID<0.9.0>, ...],
 *      monitored_by: [...], trap_exit: false]
 */
API term process_info(term pid) {
    if (!is_pid(pid)) raise_badarg("1st argument: not a pid");
    struct proc *p = proc_of(pid);
    if (!p) return am_nil;
    static const char *const status[] = {"runnable", "running", "waiting", "exiting"};
    struct list_builder info, links, monitors, watchers;
    list_builder_init(&info), list_builder_init(&links), list_builder_init(&monitors), list_builder_init(&watchers);
    for (struct link_end *e = p->links; e; e = e->next) list_builder_add(&links, pid_term(e->peer->pid));
    for (struct monitor *m = p->monitors; m; m = m->w_next)
        list_builder_add(&monitors, tuple(2, am_process, m->name ? tuple(2, m->name, am_nonode) : pid_term(m->target->pid)));
    for (struct monitor *m = p->watchers; m; m = m->t_next) list_builder_add(&watchers, pid_term(m->watcher->pid));
    if (p->name) list_builder_add(&info, tuple(2, atom("registered_name"), p->name));
    list_builder_add(&info, tuple(2, atom("status"), atom(status[p->state])));
    list_builder_add(&info, tuple(2, atom("message_queue_len"), integer(p->mbox_len)));
    list_builder_add(&info, tuple(2, atom("links"), list_builder_done(&links, NIL)));
    list_builder_add(&info, tuple(2, atom("monitors"), list_builder_done(&monitors, NIL)));
    list_builder_add(&info, tuple(2, atom("monitored_by"), list_builder_done(&watchers, NIL)));
    list_builder_add(&info, tuple(2, atom("trap_exit"), boolean(p->trap_exit)));
    return list_builder_done(&info, NIL);
}
//> agents

/* --------------------------------------------------------------------------
 * III.8  Exits, raise and catch: leaving from any depth
 * --------------------------------------------------------------------------
 * A process can end from deep inside a chain of C calls: Kernel.exit/1,
 * Kernel.raise/1, a failed match.  If no catch point is active, the process
 * jumps straight to the scheduler and its frames are simply abandoned: they
 * were only bytes on the stage, and everything the process owned (heap,
 * mailbox, saved stack) is listed in its struct proc and freed there.
 * try_catch() sets a catch point, so OTP's machinery (GenServer, below) can
 * run callbacks and survive their crashes long enough to report them.
 *
 *     a process's stack                 catch points (p->catcher)
 *     +--------------------------+
 *     | gen_server_loop          |
 *     | callback -> try_catch    | <---- frame 1: jmp_buf env  (prev: NULL)
 *     |   handle_call            |
 *     |   gen_server_call        |
 *     |     ...                  |
 *     |     exit_self(reason)    | ----> _longjmp(frame 1's env)
 *     +--------------------------+
 *
 * exit_self stores the kind and reason in the struct proc (not on the
 * stack, which it is about to abandon), pops the innermost catch point and
 * jumps to it: upward, inside the same process, so no copying is needed.
 * With no catch point, exit_now jumps to the scheduler instead.
 */

/* Jump to the innermost catch point of the running process.
 * Contract: the caller runs on vm.current's stack, and p->catcher is the
 * catch_frame of a try_catch call that has not yet returned (try_catch
 * unlinks its frame when fn returns normally), so f->env is valid and the
 * jump goes up the same stack.  The frames in between are dropped without
 * running anything: code that may exit holds no malloc'd memory across
 * the call that exits (terms live in the process heap, which outlives
 * them).  kind and reason travel in struct proc, not on the stack. */
static NORETURN void throw_to_catcher(enum caught kind, term reason) {
    struct proc *p = vm.current;
    struct catch_frame *f = p->catcher;
    /* Thrown from inside a receive (its match function raised) to a catch
     * point set outside it: that receive is abandoned, timer and all. */
    if (p->in_receive && !f->in_receive) receive_end(p);
    p->caught = kind;
    p->caught_reason = reason;
    p->catcher = f->prev;
    _longjmp(f->env, 1); /* up: try_catch's frame, in this same process */
}

/* try do fun.(arg) catch kind, reason -> ... end.  Returns CAUGHT_NOTHING
 * when fn returned, else the kind, with the reason in *reason.
 *
 * Contract: _setjmp's frame is this one, on the running process's stack;
 * throw_to_catcher jumps here from deeper in the same process.  What the
 * thrower stores goes in the struct proc, not in locals, so nothing here
 * needs to be volatile. */
API enum caught try_catch(void (*fn)(void *), void *arg, term *reason) {
    struct proc *p = vm.current;
    struct catch_frame f;
    f.prev = p->catcher;
    f.in_receive = p->in_receive;
    p->caught = CAUGHT_NOTHING;
    p->caught_reason = NULL;
    p->catcher = &f;
    if (_setjmp(f.env) == 0) {
        fn(arg);
        p->catcher = f.prev;
        *reason = NULL;
        return CAUGHT_NOTHING;
    }
    *reason = p->caught_reason;
    return p->caught;
}

/* Kernel.exit/1 */
API NORETURN void exit_self(term reason) {
    if (vm.current->catcher) throw_to_catcher(CAUGHT_EXIT, reason);
    exit_now(reason);
}

/* Kernel.raise/1.  Uncaught, the process exits with {exception, stacktrace}
 * and, being a plain process, logs it.  C keeps no stack trace, so the
 * stacktrace is always []. */
static NORETURN void raise_error(term exception) {
    if (!vm.current) {
        struct buf b = {0};
        inspect_to(&b, exception);
        fprintf(stderr, "kv: raise outside any process: %s\n", buf_str(&b));
        abort();
    }
    if (vm.current->catcher) throw_to_catcher(CAUGHT_ERROR, exception);
    log_raised(exception);
    exit_now(tuple(2, exception, NIL));
}

/* Kernel.throw/1.  Uncaught, the process exits with {{:nocatch, value},
 * stacktrace}, as on BEAM. */
API NORETURN void throw_value(term value) {
    if (vm.current->catcher) throw_to_catcher(CAUGHT_THROW, value);
    term reason = tuple(2, am_nocatch, value);
    log_raised(erlang_error(reason));
    exit_now(tuple(2, reason, NIL));
}

/* --------------------------------------------------------------------------
 * III.9  Exceptions, exit reasons and the Logger
 * --------------------------------------------------------------------------
 * An exception is a struct (a map with :__struct__ and :__exception__),
 * exactly as in Elixir: %RuntimeError{message: "boom"}.  A process that
 * raises one exits with {exception, stacktrace}.  How Elixir turns exit
 * reasons into text (Exception.format_exit/1) and how its Logger lays out
 * reports is reproduced here, because that text is how a reader recognises
 * what happened.  Two differences, both because C keeps no stack trace:
 *
 *   - Elixir only treats {exception, trace} as an exception when the trace
 *     is a non-empty list; ours is always [], so kv.c recognises the pair
 *     by the exception struct in it.
 *   - Errors the runtime raises itself (linking to a dead process, sending
 *     to an unknown name) carry on BEAM a raw Erlang reason, {:noproc,
 *     trace}, which Elixir turns into %ErlangError{} or %ArgumentError{}
 *     with the help of the trace when it is rescued or printed.  kv.c
 *     raises the Elixir exception directly, so a process that dies of one
 *     exits with {%ErlangError{original: :noproc}, []}.
 */

/* %Module{field: value, ...} with __exception__: true */
static term exception_new(term module, size_t nfields, ...) {
    term m = map(2, am_struct_, module, am_exception_, am_true);
    va_list ap;
    va_start(ap, nfields);
    for (size_t i = 0; i < nfields; i++) {
        term k = va_arg(ap, term);
        term v = va_arg(ap, term);
        m = map_insert(m, k, v);
    }
    va_end(ap);
    return m;
}

/* RuntimeError.exception(message) — %RuntimeError{message: message} */
API term runtime_error(const char *message) {
    return exception_new(am_RuntimeError, 1, am_message, string(message));
}

/* %ArgumentError{message: message} */
static term argument_error(const char *message) {
    return exception_new(am_ArgumentError, 1, am_message, string(message));
}

/* raise ArgumentError, message, where each %T in the message is the next
 * argument, a term, inspected: raise_argument_error("got: %T", t). */
static NORETURN void raise_argument_error(const char *message, ...) {
    struct buf b = {0};
    va_list ap;
    va_start(ap, message);
    buf_terms(&b, message, ap);
    va_end(ap);
    term e = argument_error(buf_str(&b));
    buf_free(&b);
    raise_error(e);
}

/* %MatchError{term: value} — what `{:ok, x} = value` raises when it fails */
API term match_error(term value) { return exception_new(am_MatchError, 1, am_term, value); }

/* %FunctionClauseError{} — no clause of module.function/arity matched */
API term function_clause_error(term module, term function, int arity) {
    return exception_new(am_FunctionClauseError, 6, am_module, module, am_function, function,
                         am_arity, integer(arity), am_kind, am_nil, am_args, am_nil, am_clauses, am_nil);
}

/* %ErlangError{original: term} — an Erlang error Elixir has no name for */
static term erlang_error(term original) {
    return exception_new(am_ErlangError, 2, am_original, original, am_reason, am_nil);
}

/* ---- Map, Keyword and length/1 ----------------------------------------------
 * Library functions take any term, and check it as Elixir's do, raising in
 * the caller.  Map's raise BadMapError when given no map: %BadMapError{term:
 * 123}, "expected a map, got: 123"; an agent whose state is a list or a
 * string then crashes with that error, alone, as on BEAM, and nothing ever
 * reads a list as if it were a map. */

/* length/1 — a proper list's length; anything else is an ArgumentError */
API size_t list_length(term l) {
    size_t n = 0;
    for (; l->kind == K_CONS; l = l->item[1]) n++;
    if (l->kind != K_NIL) raise_badarg("1st argument: not a list");
    return n;
}

/* Keyword.get/3: the value of the first {key, value} pair in kw; kw must
 * be a list and key an atom (Elixir's guards), or FunctionClauseError. */
API term keyword_get(term kw, term key, term dflt) {
    if (!is_list(kw) || !is_atom(key))
        raise_error(function_clause_error(alias("Keyword"), am_get, 3));
    for (; kw->kind == K_CONS; kw = tl(kw)) {
        term pair = hd(kw);
        if (is_tuple(pair) && tuple_size(pair) == 2 && elem(pair, 0) == key)
            return elem(pair, 1);
    }
    return dflt;
}

/* The tree t without its smallest key, which goes to *key and *value. */
static term node_remove_min(term t, term *key, term *value) {
    if (node_left(t) == NIL) {
        *key = node_key(t), *value = node_value(t);
        return node_right(t);
    }
    return node_balance(node_key(t), node_value(t), node_remove_min(node_left(t), key, value), node_right(t));
}

/* The tree t without key; *removed says whether it was there (if not,
 * t itself comes back).  A node with two subtrees gives its place to the
 * smallest key on its right. */
static term node_remove(term t, term key, bool *removed) {
    if (t == NIL) return NIL;
    int c = term_cmp(key, node_key(t));
    if (c < 0) {
        term l = node_remove(node_left(t), key, removed);
        return *removed ? node_balance(node_key(t), node_value(t), l, node_right(t)) : t;
    }
    if (c > 0) {
        term r = node_remove(node_right(t), key, removed);
        return *removed ? node_balance(node_key(t), node_value(t), node_left(t), r) : t;
    }
    *removed = true;
    if (node_left(t) == NIL) return node_right(t);
    if (node_right(t) == NIL) return node_left(t);
    term k, v, r = node_remove_min(node_right(t), &k, &v);
    return node_balance(k, v, node_left(t), r);
}

/* m without key (m itself if key is absent).  A large map that shrinks
 * to MAP_FLAT_MAX keys is laid out small again. */
static term map_remove(term m, term key) {
    if (map_is_tree(m)) {
        bool removed = false;
        term root = node_remove(m->item[0], key, &removed);
        if (!removed) return m;
        return m->n - 1 > MAP_FLAT_MAX ? map_tree(m->n - 1, root) : map_flat_of(root, m->n - 1);
    }
    long i = map_find(m, key);
    if (i < 0) return m;
    size_t n = m->n, at = (size_t)i;
    struct term *r = map_alloc(n - 1);
    for (size_t j = 0, k = 0; j < n; j++) {
        if (j == at) continue;
        r->item[k] = m->item[j];
        r->item[n - 1 + k] = m->item[n + j];
        k++;
    }
    return r;
}

static void map_check(term m) {
    if (!is_map(m)) raise_error(exception_new(alias("BadMapError"), 1, am_term, m));
}

/* Map.get/3 — nil (or the default) when the key is absent */
static term map_get(term m, term key, term dflt) {
    map_check(m);
    return map_lookup(m, key, dflt);
}

/* Map.has_key?/2 */
API bool map_has_key(term m, term key) {
    map_check(m);
    return map_has(m, key);
}

/* Map.fetch/2 — {:ok, value} or :error */
API term map_fetch(term m, term key) {
    map_check(m);
    term v = map_lookup(m, key, NULL);
    return v ? tuple(2, am_ok, v) : am_error;
}

/* Map.put/3 */
static term map_put(term m, term key, term value) {
    map_check(m);
    return map_insert(m, key, value);
}

/* Map.delete/2 */
API term map_delete(term m, term key) {
    map_check(m);
    return map_remove(m, key);
}

/* Map.pop/2 — {value or nil, map without key} */
API term map_pop(term m, term key) {
    map_check(m);
    term v = map_lookup(m, key, NULL);
    if (!v) return tuple(2, am_nil, m);
    return tuple(2, v, map_remove(m, key));
}

static bool is_exception(term t) {
    return is_map(t) && map_get(t, am_exception_, am_false) == am_true &&
           is_atom(map_get(t, am_struct_, am_nil));
}

/* {exception, stacktrace}, the reason of a process that raised */
static bool is_raised(term reason) {
    return is_tuple(reason) && tuple_size(reason) == 2 && is_exception(elem(reason, 0)) &&
           is_list(elem(reason, 1));
}

/* Module.function/arity, as Exception.format_mfa/3 writes it. */
static void mfa_text(struct buf *b, term module, term function, int64_t arity) {
    inspect_to(b, module);
    buf_printf(b, ".%s/%" PRId64, BYTES(function), arity);
}

/* Exception.message/1 */
static void exception_message(struct buf *b, term e) {
    term module = map_get(e, am_struct_, am_nil);
    if (module == am_MatchError) {
        buf_puts(b, "no match of right hand side value: ");
        inspect_to(b, map_get(e, am_term, am_nil));
    } else if (module == am_FunctionClauseError) {
        buf_puts(b, "no function clause matching in ");
        mfa_text(b, map_get(e, am_module, am_nil), map_get(e, am_function, am_nil),
                 int_value(map_get(e, am_arity, integer(0))));
    } else if (module == am_ErlangError) {
        buf_puts(b, "Erlang error: ");
        inspect_to(b, map_get(e, am_original, am_nil));
    } else if (module == alias("BadMapError")) {
        buf_puts(b, "expected a map, got: ");
        inspect_to(b, map_get(e, am_term, am_nil));
    } else if (module == alias("BadFunctionError")) {
        buf_puts(b, "expected a function, got: ");
        inspect_to(b, map_get(e, am_term, am_nil));
    } else if (module == alias("BadArityError")) {
        term args = map_get(e, am_args, NIL);
        buf_puts(b, "");
        inspect_to(b, map_get(e, atom("function"), am_nil));
        buf_printf(b, " with arity %d called with %s", map_get(e, atom("function"), NULL)->u.fun->arity,
                   list_length(args) ? "1 argument (" : "no arguments");
        if (list_length(args)) { inspect_to(b, hd(args)); buf_puts(b, ")"); }
    } else if (module == am_UndefinedFunctionError) {
        term module = map_get(e, am_module, am_nil);
        buf_puts(b, "function ");
        mfa_text(b, module, map_get(e, am_function, am_nil), int_value(map_get(e, am_arity, integer(0))));
        if (code_find(module)) {
            buf_puts(b, " is undefined or private");
        } else {
            buf_puts(b, " is undefined (module ");
            inspect_to(b, module);
            buf_puts(b, " is not available)");
        }
    } else {
        term m = map_get(e, am_message, NULL);
        if (m && is_binary(m)) buf_add(b, BYTES(m), m->n);
        else inspect_to(b, e);
    }
}

/* "** (RuntimeError) boom" — Exception.format_banner/3 for an error */
static void exception_banner(struct buf *b, term e) {
    buf_puts(b, "** (");
    inspect_to(b, map_get(e, am_struct_, am_nil));
    buf_puts(b, ") ");
    exception_message(b, e);
}

static void format_exit_to(struct buf *b, term reason, const char *joiner);

/* Module.function(arg1, arg2), from {Module, :function, [args]}. */
static void mfa_call_text(struct buf *b, term mfa) {
    inspect_to(b, elem(mfa, 0));
    buf_printf(b, ".%s(", BYTES(elem(mfa, 1)));
    for (term a = elem(mfa, 2); a->kind == K_CONS; a = tl(a)) {
        inspect_to(b, hd(a));
        if (tl(a)->kind == K_CONS) buf_puts(b, ", ");
    }
    buf_puts(b, ")");
}

/* Exception.format_exit/1, the part of it that belongs to no behaviour.
 * Each Part whose processes exit with reasons of their own (gen_server's
 * {:bad_return_value, _}, a supervisor's {:start_spec, _}, ...) adds a
 * wording function for them, from kv_init; format_exit_to tries those
 * after the shapes below that wrap other reasons, so a stage prints what
 * its own Parts know how to say. */
typedef bool (*exit_wording)(struct buf *b, term reason, const char *joiner);
static exit_wording exit_wordings[8];
static size_t n_exit_wordings;

static void exit_wording_add(exit_wording w) {
    for (size_t i = 0; i < n_exit_wordings; i++)
        if (exit_wordings[i] == w) return; /* a VM started again (kv_init) */
    if (n_exit_wordings == sizeof exit_wordings / sizeof exit_wordings[0]) abort();
    exit_wordings[n_exit_wordings++] = w;
}

/* {reason, {Module, :function, args}}: what GenServer.call and the like
 * exit with, "exited in: Module.function(args)" */
static bool is_exited_in(term reason) {
    if (!is_tuple(reason) || tuple_size(reason) != 2) return false;
    term mfa = elem(reason, 1);
    return is_tuple(mfa) && tuple_size(mfa) == 3 && is_atom(elem(mfa, 0)) && is_atom(elem(mfa, 1)) &&
           is_list(elem(mfa, 2));
}

/* "** (EXIT) reason", on the next line and one level deeper: how a reason
 * wrapped in another is printed. */
static void format_exit_nested(struct buf *b, term reason, const char *joiner) {
    char deeper[64];
    snprintf(deeper, sizeof deeper, "%s    ", joiner);
    buf_puts(b, joiner);
    buf_puts(b, "** (EXIT) ");
    format_exit_to(b, reason, deeper);
}

/* Exception.format_exit/1: an exit reason as people read it.  `joiner` is
 * the newline-plus-indent between nested parts. */
static void format_exit_to(struct buf *b, term reason, const char *joiner) {
    if (is_raised(reason)) {
        buf_puts(b, "an exception was raised:");
        buf_puts(b, joiner);
        exception_banner(b, elem(reason, 0));
        return;
    }
    for (size_t i = 0; i < n_exit_wordings; i++)
        if (exit_wordings[i](b, reason, joiner)) return;
    if (is_exited_in(reason)) {
        buf_puts(b, "exited in: ");
        mfa_call_text(b, elem(reason, 1));
        format_exit_nested(b, elem(reason, 0), joiner);
    } else if (reason == am_normal) {
        buf_puts(b, "normal");
    } else if (reason == am_shutdown) {
        buf_puts(b, "shutdown");
    } else if (reason == am_killed) {
        buf_puts(b, "killed");
    } else if (reason == am_noproc) {
        buf_puts(b, "no process: the process is not alive or there's no process currently "
                    "associated with the given name, possibly because its application isn't started");
    } else if (is_tagged(reason, am_shutdown, 2)) {
        buf_puts(b, "shutdown: ");
        inspect_to(b, elem(reason, 1));
    } else {
        inspect_to(b, reason);
    }
}

/* "** (exit) ..." — how iex and ExUnit print a process's uncaught exit. */
API void format_exit_banner(struct buf *b, term reason) {
    buf_puts(b, "** (exit) ");
    format_exit_to(b, reason, "\n    ");
}

/* ---- The Logger -----------------------------------------------------------
 * Elixir 1.14's console format is "\n$time $metadata[$level] $message\n":
 * a blank line, the time of day, the level in brackets, the message. */

enum log_level { LOG_DEBUG, LOG_INFO, LOG_NOTICE, LOG_WARNING, LOG_ERROR, LOG_NONE };
static enum log_level logger_level = LOG_DEBUG; /* Logger's default */

/* The :logger application is running: Application.stop(:logger), from
 * supervisor-and-application.md on (Part VII), silences it. */
static bool logger_started = true;

static void logger_log(enum log_level level, const char *message) {
    static const char *const names[] = {"debug", "info", "notice", "warning", "error"};
    if (level < logger_level || !logger_started) return;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    time_t secs = now.tv_sec;
    struct tm tm;
    localtime_r(&secs, &tm);
    struct buf b = {0};
    buf_printf(&b, "\n%02d:%02d:%02d.%03ld [%s] %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
               now.tv_nsec / 1000000, names[level], message);
    vm.out(buf_str(&b), b.len);
    buf_free(&b);
}

/* [error] Process #PID<0.112.0> raised an exception / ** (RuntimeError) boom */
static void log_raised(term exception) {
    struct buf b = {0};
    buf_printf(&b, "Process #PID<0.%" PRIu64 ".0> raised an exception\n", vm.current->pid);
    exception_banner(&b, exception);
    logger_log(LOG_ERROR, buf_str(&b));
    buf_free(&b);
}

/* --------------------------------------------------------------------------
 * III.10  Modules, and apply/3
 * --------------------------------------------------------------------------
 * Code can name a function as data, {module, function, args}, for apply/3
 * to call: Agent's {module, function, args} forms do.
 * So does a child spec, {KV.Registry, :start_link, [[]]}, for its supervisor.  //> supervisor-and-application
 * BEAM finds the function in its export table, by module and name.  kv.c keeps a
 * table too: every module it defines is a struct module, loaded into the
 * table at start-up (code_load), with the functions apply/3 may call, and,
 * for a module that `use`s a behaviour, the callbacks that behaviour calls.
 */

/* A function apply/3 can call.  One of arity 1 is the C function itself,
 * called with its one argument; for any other arity, `fun` receives the
 * argument list. */
struct export {
    const char *name;
    int arity;
    term (*fun)(term arg_or_args);
};

struct module {
    const char *name;             /* "KV.Registry", as Elixir writes it */
    const struct export *exports; /* ends with {NULL} */

    /* Callbacks, for modules that use a behaviour; NULL where the module
     * does not define one (the behaviour's default applies).  Their shapes
     * are Elixir's: init(arg), handle_call(request, from, state), ... */
    term (*init)(term arg);
    term (*handle_call)(term request, term from, term state);
    term (*handle_cast)(term request, term state);
    term (*handle_info)(term msg, term state);
    void (*terminate)(term reason, term state);
    /* use Application: start(type, args) gives {:ok, pid} of the top    //> supervisor-and-application/naming
     * supervisor; prep_stop(state) and stop(state) run when it stops. */ //> supervisor-and-application/naming
    term (*start)(term type, term args);                                   //> supervisor-and-application/naming
    term (*prep_stop)(term state);                                         //> supervisor-and-application/naming
    void (*stop)(term state);                                              //> supervisor-and-application/naming
};

static struct {
    const struct module **mods;
    size_t n, cap;
} code;

/* Make a module known to apply/3 and to the behaviours. */
static void code_load(const struct module *m) {
    if (code.n == code.cap) {
        code.cap = code.cap ? code.cap * 2 : 32;
        code.mods = vm_realloc(code.mods, code.cap * sizeof *code.mods);
    }
    code.mods[code.n++] = m;
}

/* Forget every loaded module (vm_shutdown). */
static void code_purge(void) {
    vm_free(code.mods);
    memset(&code, 0, sizeof code);
}

/* The module called `name` (an atom such as KV.Registry), or NULL. */
static const struct module *code_find(term name) {
    if (!is_atom(name)) return NULL;
    const char *s = BYTES(name);
    if (name->n > 7 && memcmp(s, "Elixir.", 7) == 0) s += 7;
    for (size_t i = 0; i < code.n; i++)
        if (strcmp(code.mods[i]->name, s) == 0) return code.mods[i];
    return NULL;
}

/* __MODULE__ — a module's name as an atom: KV.Registry is :"Elixir.KV.Registry" */
API term module_atom(const struct module *m) { return alias(m->name); }

/* A module's name as reports give it: "KV.Registry" (atoms live forever,
 * so the text can be kept). */
static const char *module_label(term module) {
    if (!is_atom(module)) return NULL;
    const char *s = BYTES(module);
    return module->n > 7 && memcmp(s, "Elixir.", 7) == 0 ? s + 7 : s;
}

/* A behaviour calls module.init(arg) as apply/3 would: a module that is
 * not an atom is an ArgumentError, one that was never loaded (or has no
 * init/1) an UndefinedFunctionError, raised in the process that calls it.
 * *code gets the module's table, for the other callbacks. */
static term behaviour_init(term module, term arg, const struct module **code) {
    if (!is_atom(module)) raise_badarg("1st argument: not an atom");
    const struct module *m = code_find(module);
    if (!m || !m->init) raise_error(undefined_function_error(module, am_init, 1));
    *code = m;
    return m->init(arg);
}

static bool is_proper_list(term l) {
    while (l->kind == K_CONS) l = tl(l);
    return l->kind == K_NIL;
}

/* apply/3: call module.function(args...).  A module or function that is
 * not an atom, or args that are not a proper list, raise the ArgumentError
 * :erlang.apply/3 raises, naming each bad argument. */
API term erlang_apply(term module, term function, term args) {
    static const char *const what[3] = {"1st argument: not an atom", "2nd argument: not an atom",
                                        "3rd argument: not a proper list"};
    bool bad[3] = {!is_atom(module), !is_atom(function), !is_proper_list(args)};
    if (bad[0] || bad[1] || bad[2]) {
        struct buf b = {0};
        buf_puts(&b, BADARG_HEAD); /* then one line per bad argument */
        for (int i = 0; i < 3; i++)
            if (bad[i]) buf_printf(&b, "  * %s\n", what[i]);
        term e = argument_error(buf_str(&b));
        buf_free(&b);
        raise_error(e);
    }
    const struct module *m = code_find(module);
    int arity = (int)list_length(args);
    for (const struct export *e = m ? m->exports : NULL; e && e->name; e++)
        if (e->arity == arity && strcmp(e->name, BYTES(function)) == 0) return e->fun(arity == 1 ? hd(args) : args);
    raise_error(undefined_function_error(module, function, arity));
}

/* %UndefinedFunctionError{}: module.function/arity does not exist */
static term undefined_function_error(term module, term function, int arity) {
    return exception_new(am_UndefinedFunctionError, 5, am_module, module, am_function, function, am_arity,
                         integer(arity), am_reason, am_nil, am_message, am_nil);
}

/* The x of `{:ok, x} = result`; anything else raises MatchError, as the
 * pattern would. */
API term ok_value(term result) {
    if (!is_tagged(result, am_ok, 2)) raise_error(match_error(result));
    return elem(result, 1);
}

/* Calling a fun: f.(arg), or f.() for a fun of arity 0.  Anything that is
 * not a fun of that arity raises, as in Elixir. */
API term fun_call(term f, term arg) {
    int arity = arg ? 1 : 0;
    if (!is_function(f)) raise_error(exception_new(alias("BadFunctionError"), 1, am_term, f));
    if (f->u.fun->arity != arity)
        raise_error(exception_new(alias("BadArityError"), 2, atom("function"), f, am_args,
                                  arg ? list(1, arg) : NIL));
    return f->u.fun->code(f->item[0], arg);
}

//> agents
/* ==========================================================================
 * PART IV — OTP'S GENERIC SERVER: WHAT AGENT AND GENSERVER RUN ON
 * ==========================================================================
 *
 * IV.1  A server in pictures
 * --------------------------
 *
 * A server is a process that holds a state and answers requests about it.
 * Its loop is always the same: wait for a message, work out what kind it
 * is, call the callback module's function for that kind with the state,
 * keep the state the function returns, and wait again.  OTP writes that
 * loop once, in gen_server, and everything else in the guide stands on it:
 * an Agent is a gen_server whose callbacks run the funs it is sent
 * (Part V).
 * KV.Registry is a gen_server with callbacks of its own (Part VI).      //> genservers
 * So is Supervisor (Part VII).                                          //> supervisor-and-application
 * So is the application controller (Part VII).                          //> supervisor-and-application/naming
 * So is DynamicSupervisor (Part VIII).                                  //> dynamic-supervisor/bucket-supervisor
 * The guide writes only callbacks and clients; this Part is the other
 * half, OTP's, which the guide takes for granted.
 *
 * A server's life:
 *
 *     GenServer.start_link(M, arg)          the new process
 *     ----------------------------          ---------------
 *     spawn, link, wait for the ack  ---->  register the name, if any
 *                                           M.init(arg) -> {:ok, state}
 *                 {:ok, pid}  <-----------  ack: {:ok, pid}
 *                                           loop:
 *                                             receive any message
 *     GenServer.call(pid, req)   -------->    {:"$gen_call", from, req}
 *                                               M.handle_call(req, from, state)
 *                 reply  <----------------      -> {:reply, reply, state2}
 *     GenServer.cast(pid, req)   -------->    {:"$gen_cast", req}
 *                                               M.handle_cast(req, state)
 *     send(pid, msg), a :DOWN, ...   ---->    anything else
 *                                               M.handle_info(msg, state)
 *                                             ... until a callback returns
 *                                             {:stop, reason, ...}, raises,
 *                                             or the parent's EXIT comes:
 *                                           M.terminate(reason, state)
 *                                           exit(reason)
 *
 * Three things the loop does that the guide relies on without saying so:
 *
 *   - Every callback runs inside a catch point (III.8).  A callback that
 *     raises does not take the loop down with a C-level crash: the loop
 *     catches it, logs the crash report Elixir's Logger prints ("GenServer
 *     KV.Registry terminating ..."), runs terminate/2 and exits with the
 *     reason, so whoever is linked or monitoring hears of it.
 *   - A server that traps exits treats an EXIT from its parent (the
 *     process that started it: a supervisor) as an order to stop, and
 *     terminates; an EXIT from anyone else is just a message for
 *     handle_info.  That is how a supervisor shuts its children down.
 *   - Between messages only the state is live, so the loop compacts the
 *     process's heap around it now and then (the one-root collector of
 *     III.7): a registry that handles a million lookups does not keep a
 *     million lookups' garbage.
 *
 * The client's half (IV.4) is a few lines per call: GenServer.call
 * monitors the server, sends {:"$gen_call", {self, tag}, request} and
 * waits for a reply carrying the tag, or the server's :DOWN, or the
 * timeout (5 seconds unless told otherwise).
 */

/* --------------------------------------------------------------------------
 * IV.2  The loop, and the callbacks it calls
 * --------------------------------------------------------------------------
 * The server's own facts (its module, state, parent and name) are kept in
 * a struct gen_server on its stack, for the whole life of the loop: the
 * stack is saved and restored with the process (III.3), so the struct
 * stays put while the server waits.
 */

/* Part IV's atoms: gen_server's messages, results and reasons (I.3 says how atoms are declared). */
#define GEN_SERVER_ATOMS(X) X(timeout, "timeout") X(alias, "alias") X(calling_self, "calling_self") \
    X(gen_call, "$gen_call") X(gen_cast, "$gen_cast") X(system, "system") X(terminate, "terminate") \
    X(get_state, "get_state") X(call, "call") X(stop, "stop") X(reply, "reply") \
    X(noreply, "noreply") X(ignore, "ignore") X(bad_return_value, "bad_return_value") \
    X(already_started, "already_started") X(ack, "ack") X(name, "name") \
    X(GenServer, "Elixir.GenServer") X(cast, "cast") X(sys, "sys") X(id, "id") X(start, "start") \
    X(restart, "restart") X(type, "type") X(permanent, "permanent") X(worker, "worker") \
    X(bad_call, "bad_call") X(bad_cast, "bad_cast") X(start_link, "start_link")
DECLARE_ATOMS(GEN_SERVER_ATOMS)

struct gen_server {
    term module;                /* the callback module's name, KV.Registry */
    const struct module *mod;   /* ...and its code, once init/1 was found */
    term state;
    term name;       /* registered name, or NULL */
    uint64_t parent; /* the process that started it (start_link's caller) */
    int64_t timeout; /* from {:noreply, state, timeout}; NO_TIMEOUT if none */
};

/* Is this an exit reason OTP considers normal (no crash report)? */
static bool is_normal_exit(term reason) {
    return reason == am_normal || reason == am_shutdown || is_tagged(reason, am_shutdown, 2);
}

/* The server as logs name it: its registered name, or its pid. */
static term server_label(const struct gen_server *gs) { return gs->name ? gs->name : self(); }

/* [error] GenServer KV.Registry terminating ... — the crash report, in the
 * shape Elixir's Logger gives it (without stack traces: C keeps none). */
static void log_terminate(const struct gen_server *gs, term reason, term last, term from) {
    struct buf b = {0};
    buf_puts(&b, "GenServer ");
    inspect_to(&b, server_label(gs));
    buf_puts(&b, " terminating\n");
    if (is_raised(reason)) exception_banner(&b, elem(reason, 0));
    else { buf_puts(&b, "** (stop) "); format_exit_to(&b, reason, "\n    "); }
    buf_puts(&b, "\nLast message");
    if (from) { buf_puts(&b, " (from "); inspect_to(&b, elem(from, 0)); buf_puts(&b, ")"); }
    buf_puts(&b, ": ");
    inspect_to(&b, last);
    buf_puts(&b, "\nState: ");
    inspect_to(&b, gs->state);
    if (from) {
        buf_puts(&b, "\nClient ");
        inspect_to(&b, elem(from, 0));
        buf_puts(&b, process_alive(elem(from, 0)) ? " is alive" : " is dead");
    }
    logger_log(LOG_ERROR, buf_str(&b));
    buf_free(&b);
}

/* A callback, run inside a catch point: what it returned, or how it died. */
enum callback { CB_INIT, CB_CALL, CB_CAST, CB_INFO, CB_TERMINATE };

struct callback_run {
    struct gen_server *gs;
    enum callback which;
    term msg, from;
    term result;
};

/* use GenServer's handle_call/3 and handle_cast/2: a module that receives
 * a call (or a cast) it has no callback for crashes, saying so. */
static NORETURN term no_callback(struct gen_server *gs, const char *what, const char *callback_name) {
    struct buf b = {0};
    buf_printf(&b, "attempted to %s GenServer ", what);
    inspect_to(&b, server_label(gs));
    buf_printf(&b, " but no %s clause was provided", callback_name);
    term e = runtime_error(buf_str(&b));
    buf_free(&b);
    raise_error(e);
}

/* use GenServer's handle_info/2: log the stray message and carry on. */
static term default_handle_info(struct gen_server *gs, term msg) {
    struct buf b = {0};
    inspect_to(&b, gs->module);
    buf_puts(&b, " ");
    inspect_to(&b, server_label(gs));
    buf_puts(&b, " received unexpected message in handle_info/2: ");
    inspect_to(&b, msg);
    logger_log(LOG_ERROR, buf_str(&b));
    buf_free(&b);
    return tuple(2, am_noreply, gs->state);
}

static void run_callback(void *arg) {
    struct callback_run *r = arg;
    struct gen_server *gs = r->gs;
    const struct module *m = gs->mod;
    switch (r->which) {
    case CB_INIT:
        r->result = behaviour_init(gs->module, r->msg, &gs->mod);
        break;
    case CB_CALL:
        r->result = m->handle_call ? m->handle_call(r->msg, r->from, gs->state) : no_callback(gs, "call", "handle_call/3");
        break;
    case CB_CAST:
        r->result = m->handle_cast ? m->handle_cast(r->msg, gs->state) : no_callback(gs, "cast", "handle_cast/2");
        break;
    case CB_INFO:
        r->result = m->handle_info ? m->handle_info(r->msg, gs->state) : default_handle_info(gs, r->msg);
        break;
    case CB_TERMINATE:
        if (m->terminate) m->terminate(r->msg, gs->state);
        r->result = am_ok;
        break;
    }
}

/* Run a callback.  Returns its result, or NULL with *reason set to the
 * exit reason its crash means: {exception, []} for a raise, the reason of
 * an exit.  A value thrown with throw/1 is taken as the callback's result,
 * as OTP's gen_server does. */
static term callback(struct gen_server *gs, enum callback which, term msg, term from, term *reason) {
    struct callback_run r = {gs, which, msg, from, NULL};
    term caught;
    switch (try_catch(run_callback, &r, &caught)) {
    case CAUGHT_NOTHING: return r.result;
    case CAUGHT_EXIT: *reason = caught; return NULL;
    case CAUGHT_ERROR: *reason = tuple(2, caught, NIL); return NULL;
    case CAUGHT_THROW: /* gen_server catches a throw: it is the result */
        return caught;
    }
    return NULL;
}

API term gen_server_reply(term from, term reply);

/* Stop the server: terminate/2 if the module has one, a crash report if
 * the reason is not a normal one, then exit.  `last` and `from` are the
 * message being handled, for the report.  A {:stop, reason, reply, state}
 * from handle_call also passes `reply`: OTP sends it after terminate/2 has
 * run, just before the server exits. */
static NORETURN void gen_server_terminate(struct gen_server *gs, term reason, term last, term from, term reply) {
    term crash;
    if (!callback(gs, CB_TERMINATE, reason, NULL, &crash)) reason = crash;
    if (!is_normal_exit(reason)) log_terminate(gs, reason, last, from);
    if (reply) gen_server_reply(from, reply);
    exit_now(reason);
}

/* GenServer.reply/2: send `reply` to the caller waiting in GenServer.call.
 * from is {pid, [:alias | ref]}: the reply goes to the caller's alias, so
 * it is dropped if the caller has stopped waiting.  Any other {pid, tag}
 * simply gets {tag, reply}, as with :gen.reply; anything else is a
 * FunctionClauseError, as there. */
API term gen_server_reply(term from, term reply) {
    if (!is_tuple(from) || tuple_size(from) != 2 || !is_pid(elem(from, 0)))
        raise_error(function_clause_error(atom("gen"), atom("reply"), 2));
    term to = elem(from, 0), tag = elem(from, 1);
    if (is_list(tag) && tag->kind == K_CONS && hd(tag) == am_alias && is_reference(tl(tag)))
        process_send_alias(to, tl(tag), tuple(2, tag, reply));
    else
        process_send(to, tuple(2, tag, reply)); /* a plain {pid, tag} */
    return am_ok;
}

/* A callback's timeout element: :infinity or an integer >= 0, else the
 * whole result is a bad return value (false).  gen_server checks no upper
 * bound here; receive does (gen_server_loop). */
static bool callback_timeout(term t, int64_t *ms) {
    if (t == am_infinity) *ms = NO_TIMEOUT;
    else if (is_integer(t) && int_value(t) >= 0) *ms = int_value(t);
    else return false;
    return true;
}

/* Act on what handle_call returned. */
static void handle_call_result(struct gen_server *gs, term r, term msg, term from) {
    size_t n = is_tuple(r) ? tuple_size(r) : 0;
    term tag = n ? elem(r, 0) : NULL;
    int64_t timeout = NO_TIMEOUT;
    if (tag == am_reply && (n == 3 || (n == 4 && callback_timeout(elem(r, 3), &timeout)))) {
        gen_server_reply(from, elem(r, 1));
        gs->state = elem(r, 2);
        gs->timeout = timeout;
    } else if (tag == am_noreply && (n == 2 || (n == 3 && callback_timeout(elem(r, 2), &timeout)))) {
        gs->state = elem(r, 1);
        gs->timeout = timeout;
    } else if (tag == am_stop && n == 4) {
        gs->state = elem(r, 3);
        gen_server_terminate(gs, elem(r, 1), msg, from, elem(r, 2));
    } else if (tag == am_stop && n == 3) {
        gs->state = elem(r, 2);
        gen_server_terminate(gs, elem(r, 1), msg, from, NULL);
    } else {
        gen_server_terminate(gs, tuple(2, am_bad_return_value, r), msg, from, NULL);
    }
}

/* Act on what handle_cast or handle_info returned. */
static void handle_noreply_result(struct gen_server *gs, term r, term msg) {
    size_t n = is_tuple(r) ? tuple_size(r) : 0;
    term tag = n ? elem(r, 0) : NULL;
    int64_t timeout = NO_TIMEOUT;
    if (tag == am_noreply && (n == 2 || (n == 3 && callback_timeout(elem(r, 2), &timeout)))) {
        gs->state = elem(r, 1);
        gs->timeout = timeout;
    } else if (tag == am_stop && n == 3) {
        gs->state = elem(r, 2);
        gen_server_terminate(gs, elem(r, 1), msg, NULL, NULL);
    } else {
        gen_server_terminate(gs, tuple(2, am_bad_return_value, r), msg, NULL, NULL);
    }
}

/* One message, dispatched as gen_server does. */
static void gen_server_handle(struct gen_server *gs, term msg) {
    term r, reason = NULL;
    if (is_tagged(msg, am_gen_call, 3)) {
        term from = elem(msg, 1);
        if (!(r = callback(gs, CB_CALL, elem(msg, 2), from, &reason)))
            gen_server_terminate(gs, reason, elem(msg, 2), from, NULL);
        handle_call_result(gs, r, elem(msg, 2), from);
    } else if (is_tagged(msg, am_gen_cast, 2)) {
        if (!(r = callback(gs, CB_CAST, elem(msg, 1), NULL, &reason)))
            gen_server_terminate(gs, reason, msg, NULL, NULL);
        handle_noreply_result(gs, r, msg);
    } else if (is_tagged(msg, am_EXIT, 3) && vm.current->trap_exit && is_pid(elem(msg, 1)) &&
               elem(msg, 1)->u.id == gs->parent) {
        /* Our parent (a supervisor, say) wants us gone: terminate, even
         * for :normal.  An EXIT from anyone else is just a message. */
        gen_server_terminate(gs, elem(msg, 2), msg, NULL, NULL);
    } else if (is_tagged(msg, am_system, 3) && is_tagged(elem(msg, 2), am_terminate, 2)) {
        /* GenServer.stop/3 */
        gen_server_terminate(gs, elem(elem(msg, 2), 1), NIL, NULL, NULL);
    } else if (is_tagged(msg, am_system, 3) && elem(msg, 2) == am_get_state) {
        gen_server_reply(elem(msg, 1), gs->state); /* :sys.get_state/1 */
    } else {
        if (!(r = callback(gs, CB_INFO, msg, NULL, &reason))) gen_server_terminate(gs, reason, msg, NULL, NULL);
        handle_noreply_result(gs, r, msg);
    }
}

/* The loop.  After each message only gs->state is live, so the heap is
 * collected around it: when the state is the one the last compaction
 * kept, by dropping what was made since, as soon as that passes 1 KiB
 * (it costs nothing to copy); otherwise by compacting, once the heap has
 * grown to twice what the last compaction kept (plus the same slack), so
 * that a large state is copied only when as much garbage has piled up:
 * the one-root collector of III.7.  A timeout from
 * the last callback ({:noreply, state, 100}) becomes this receive's
 * `after`; when it fires, handle_info gets :timeout. */
static NORETURN void gen_server_loop(struct gen_server *gs) {
    struct heap *heap = &vm.current->heap;
    for (;;) {
        int64_t timeout = gs->timeout;
        gs->timeout = NO_TIMEOUT;
        /* An integer that receive cannot wait for: gen_server's own loop
         * crashes, outside any callback, so nothing is logged. */
        if (timeout != NO_TIMEOUT && timeout > AFTER_MAX) exit_now(tuple(2, am_timeout_value, NIL));
        term msg = receive_full(NULL, NULL, timeout, "a message, in its GenServer loop", NULL);
        gen_server_handle(gs, msg ? msg : am_timeout);
        if (heap->bytes > heap->live + 1024 && !heap_drop_young(heap, gs->state) &&
            heap->bytes > 2 * heap->live + 1024)
            gs->state = heap_compact(heap, gs->state);
    }
}

/* gen_server's exit reasons, as Exception.format_exit words them. */
static bool gen_server_exit_wording(struct buf *b, term reason, const char *joiner) {
    (void)joiner;
    if (reason == am_calling_self) buf_puts(b, "process attempted to call itself");
    else if (reason == am_timeout) buf_puts(b, "time out");
    else if (is_tagged(reason, am_bad_return_value, 2)) buf_puts(b, "bad return value: ");
    else if (is_tagged(reason, am_already_started, 2)) buf_puts(b, "already started: ");
    else if (is_tagged(reason, am_bad_call, 2)) buf_puts(b, "bad call: ");
    else if (is_tagged(reason, am_bad_cast, 2)) buf_puts(b, "bad cast: ");
    else return false;
    if (is_tuple(reason)) inspect_to(b, elem(reason, 1));
    return true;
}

/* --------------------------------------------------------------------------
 * IV.3  Starting a server: GenServer.start_link and the new process's init
 * --------------------------------------------------------------------------
 * Starting is a handshake, as OTP's proc_lib does it.  The caller spawns
 * the process (linked, for start_link), monitors it, and waits; the new
 * process registers its name, runs init/1 and answers {:ack, tag, result}.
 * The caller returns that result: {:ok, pid}, :ignore or {:error, reason}.
 * The monitor is there for a process that dies before it can answer (its
 * :DOWN carries the reason); a timeout: option kills an init that is too
 * slow.  A failed start still makes the new process exit with the reason,
 * link and all, as OTP 25 does: a linked caller that does not trap exits
 * goes down with it.
 */

/* Start-up, in the new process.  arg is
 *     {module, init_arg, name or nil, starter, parent, tag}
 * The starter waits for {:ack, tag, result} (OTP's proc_lib:init_ack). */
static void gen_server_main(term arg) {
    struct gen_server gs = {0};
    gs.module = elem(arg, 0);
    gs.timeout = NO_TIMEOUT;
    term name = elem(arg, 2), starter = elem(arg, 3), tag = elem(arg, 5);
    gs.parent = is_pid(elem(arg, 4)) ? elem(arg, 4)->u.id : vm.current->pid;
    gs.state = am_undefined;
    if (name != am_nil) {
        struct proc *holder = whereis_proc(name);
        if (holder) { /* the name is taken: {:error, {:already_started, pid}} */
            term err = tuple(2, am_error, tuple(2, am_already_started, pid_term(holder->pid)));
            process_send(starter, tuple(3, am_ack, tag, err));
            exit_now(am_normal);
        }
        process_register(self(), name);
        gs.name = name;
    }
    term reason, r = callback(&gs, CB_INIT, elem(arg, 1), NULL, &reason);
    term ack;
    if (!r) {
        ack = tuple(2, am_error, reason); /* init raised or exited */
    } else if (is_tagged(r, am_ok, 2) || (is_tagged(r, am_ok, 3) && callback_timeout(elem(r, 2), &gs.timeout))) {
        gs.state = elem(r, 1);
        process_send(starter, tuple(3, am_ack, tag, tuple(2, am_ok, self())));
        gen_server_loop(&gs);
    } else if (r == am_ignore) {
        reason = am_normal;
        ack = am_ignore;
    } else if (is_tagged(r, am_stop, 2)) {
        reason = elem(r, 1);
        ack = tuple(2, am_error, reason);
    } else {
        reason = tuple(2, am_bad_return_value, r);
        ack = tuple(2, am_error, reason);
    }
    /* OTP 25: the failed server still exits with the reason, link and all:
     * a linked caller that does not trap exits goes down with it. */
    process_send(starter, tuple(3, am_ack, tag, ack));
    exit_now(reason);
}

static bool match_ack(term msg, const void *arg) {
    const term *refs = arg; /* {ack tag, monitor ref} */
    return (is_tagged(msg, am_ack, 3) && term_eq(elem(msg, 1), refs[0])) ||
           (is_tagged(msg, am_DOWN, 5) && term_eq(elem(msg, 1), refs[1]));
}

static bool is_exit_from(term msg, const void *pid) {
    return is_tagged(msg, am_EXIT, 3) && term_eq(elem(msg, 1), (term)pid);
}

/* The name option must be nil or an atom (the {:global, _} and {:via, _, _}
 * forms need distribution and registries kv.c does not have). */
static void check_name_option(term name) {
    if (name == am_nil || is_atom(name)) return;
    raise_argument_error("expected :name option to be one of the following:\n\n  * nil\n  * atom\n"
                         "  * {:global, term}\n  * {:via, module, term}\n\nGot: %T", name);
}

/* Start a GenServer running `mod`, linked to the caller if `link`, and
 * wait until its init/1 has returned: {:ok, pid}, :ignore or {:error, _}.
 * opts: [name: atom], [timeout: ms for init]. */
static term gen_start(term module, term arg, term opts, bool link) {
    term name = keyword_get(opts, am_name, am_nil);
    check_name_option(name);
    int64_t timeout = after_ms(keyword_get(opts, am_timeout, am_infinity));
    term me = self(), tag = make_ref();
    term init = tuple(6, module, arg, name, me, link ? me : am_nil, tag);
    struct proc *child = proc_spawn(gen_server_main, init, module_label(module));
    term pid = pid_term(child->pid);
    if (link) link_add(vm.current, child);
    term mref = process_monitor(pid);
    term refs[2] = {tag, mref};
    term m = receive_full(match_ack, refs, timeout, "the init/1 of", pid);
    process_demonitor(mref, true);
    if (m && is_tagged(m, am_ack, 3)) return elem(m, 2);
    if (m) return tuple(2, am_error, elem(m, 4)); /* died before answering */
    /* init/1 took too long: kill it, quietly. */
    process_unlink(pid);
    process_exit(pid, am_kill);
    receive_now(is_exit_from, pid);
    return tuple(2, am_error, am_timeout);
}

/* GenServer.start_link/3 — module's callbacks, init(arg), options [name: ...] */
API term gen_server_start_link(term module, term arg, term opts) {
    if (!is_atom(module)) raise_error(function_clause_error(am_GenServer, am_start_link, 3));
    return gen_start(module, arg, opts, true);
}

/* GenServer.start/3 — the same without a link: the server is its own parent */
API term gen_server_start(term module, term arg, term opts) {
    if (!is_atom(module)) raise_error(function_clause_error(am_GenServer, am_start, 3));
    return gen_start(module, arg, opts, false);
}

/* --------------------------------------------------------------------------
 * IV.4  The client: GenServer.call, cast, reply and stop
 * --------------------------------------------------------------------------
 * A call is a message and a wait.  The wait must end in one of three
 * ways, and only those: the reply, the server's death, or the timeout.
 * So the caller monitors the server first: a server that is gone, or dies
 * while working on the request, sends a :DOWN, and the caller exits with
 * the :DOWN's reason, wrapped as {reason, {GenServer, :call, [server,
 * request, timeout]}} (which Exception.format_exit prints as "exited in:
 * GenServer.call(...)").  The monitor doubles as a reply alias: the reply
 * is sent to the alias, and demonitoring deactivates it, so a reply that
 * comes after a timeout is dropped instead of landing, unexpected, in the
 * caller's mailbox.
 *
 *     caller                                   server
 *     mref = monitor(server), as an alias
 *     --- {:"$gen_call", {self, [:alias | mref]}, req} --->
 *                                              handle_call(req, from, s)
 *     <---------- {[:alias | mref], reply} -----  GenServer.reply(from, r)
 *     demonitor(mref): the alias is gone
 */

static bool match_reply(term msg, const void *mref) {
    term ref = mref;
    if (is_tagged(msg, am_DOWN, 5)) return term_eq(elem(msg, 1), ref);
    return is_tuple(msg) && tuple_size(msg) == 2 && elem(msg, 0)->kind == K_CONS &&
           hd(elem(msg, 0)) == am_alias && term_eq(tl(elem(msg, 0)), ref);
}

/* The heart of GenServer.call (OTP's gen:call): monitor the server, with
 * the monitor as a reply alias; send the request; wait for the reply or
 * the server's DOWN.  `label` and `fun` name the call in exit reasons:
 * {reason, {GenServer, :call, [server, request, timeout]}}. */
static term gen_call(term server, term label, term request, term timeout, term module, term fun) {
    if (!is_pid(server) && !is_atom(server))
        raise_error(function_clause_error(am_GenServer, atom("whereis"), 1));
    term where = tuple(3, module, fun, list(3, server, request, timeout));
    struct proc *p = server_proc(server);
    if (p == vm.current) exit_self(tuple(2, am_calling_self, where));
    term pid = p ? pid_term(p->pid) : server;
    struct msg **mark = receive_mark(); /* before the monitor's ref is made */
    term mref = process_monitor(p ? pid : server);
    monitor_make_alias(mref);
    term tag = cons(am_alias, mref);
    if (p) process_send(pid, tuple(3, label, tuple(2, self(), tag), request));
    /* An integer too long for receive raises here, after the request went
     * out (as gen:call does): the reply will arrive as a stray message. */
    term m = receive_from(mark, match_reply, mref, after_ms(timeout), "a GenServer.call reply from", pid);
    if (m && !is_tagged(m, am_DOWN, 5)) {
        process_demonitor(mref, true);
        return elem(m, 1);
    }
    if (m) exit_self(tuple(2, elem(m, 4), where)); /* the server died */
    /* Timed out.  Deactivate the alias, so a late reply never arrives, but
     * take one that came in the meantime. */
    process_demonitor(mref, true);
    m = receive_now(match_reply, mref);
    if (m) return elem(m, 1);
    exit_self(tuple(2, am_timeout, where));
}

#define GEN_SERVER_DEFAULT_TIMEOUT 5000 /* GenServer.call's, in milliseconds */
#define DEFAULT_TIMEOUT integer(GEN_SERVER_DEFAULT_TIMEOUT)

/* :infinity or an integer >= 0: the guard of GenServer.call/3 and friends */
static bool is_timeout(term t) { return t == am_infinity || (is_integer(t) && int_value(t) >= 0); }

/* GenServer.call/3 — the server's reply; exits if there is none in time.
 * timeout: :infinity or milliseconds. */
API term gen_server_call_timeout(term server, term request, term timeout) {
    if (!is_timeout(timeout)) raise_error(function_clause_error(am_GenServer, am_call, 3));
    return gen_call(server, am_gen_call, request, timeout, am_GenServer, am_call);
}

/* GenServer.call/2 — with the default timeout of 5 seconds */
API term gen_server_call(term server, term request) {
    return gen_server_call_timeout(server, request, DEFAULT_TIMEOUT);
}

/* GenServer.cast/2 — always :ok, even if nobody is there to receive it */
API term gen_server_cast(term server, term request) {
    if (!is_pid(server) && !is_atom(server)) raise_error(function_clause_error(am_GenServer, am_cast, 2));
    struct proc *p = server_proc(server);
    if (p) deliver(p, tuple(2, am_gen_cast, request));
    return am_ok;
}

/* :sys.get_state/1 — a GenServer's state, asked for as a system message */
API term sys_get_state(term server) {
    return gen_call(server, am_system, am_get_state, DEFAULT_TIMEOUT, am_sys, am_get_state);
}

/* GenServer.stop/3 — ask the server to terminate with `reason` and wait
 * for it to be gone: :ok, or an exit if it was not there. */
API term gen_server_stop(term server, term reason, term timeout) {
    if (!is_pid(server) && !is_atom(server))
        raise_error(function_clause_error(am_GenServer, atom("whereis"), 1));
    term where = tuple(3, am_GenServer, am_stop, list(3, server, reason, timeout));
    if (!is_timeout(timeout)) { /* OTP's :sys.terminate refuses it, in a helper, as an exit */
        term sys = tuple(3, am_sys, am_terminate, list(3, server, reason, timeout));
        term why = tuple(2, function_clause_error(atom("gen"), am_call, 4), NIL);
        exit_self(tuple(2, tuple(2, why, sys), where));
    }
    struct proc *p = server_proc(server);
    if (!p) exit_self(tuple(2, am_noproc, where));
    if (p == vm.current) exit_self(tuple(2, am_calling_self, where));
    term pid = pid_term(p->pid);
    term mref = process_monitor(pid);
    process_send(pid, tuple(3, am_system, tuple(2, self(), cons(am_alias, mref)),
                               tuple(2, am_terminate, reason)));
    term m = receive_full(match_reply, mref, after_ms(timeout), "the end of GenServer.stop of", pid);
    if (!m) {
        process_demonitor(mref, true);
        exit_self(tuple(2, am_timeout, where));
    }
    term down_reason = elem(m, 4);
    if (!term_eq(down_reason, reason)) exit_self(tuple(2, down_reason, where));
    return am_ok;
}

/* --------------------------------------------------------------------------
 * IV.5  use GenServer, use Agent: child_spec/1
 * --------------------------------------------------------------------------
 * `use GenServer` and `use Agent` (and, later, `use Supervisor`) give the
 * module a child_spec/1: a map saying how to start the module's process,
 * which supervisors read.  kv.c generates it with every key, as older
 * Elixir printed it.  Elixir 1.14 prints only what is not a default.
 * child_spec_as_1_14 (Part VII) gives that newer form.     //> supervisor-and-application
 */

#define DEFAULT_SHUTDOWN 5000 /* ms a worker gets to stop after :shutdown */

/* What `use GenServer` (type :worker) or, later, `use Supervisor` (type
 * :supervisor, whose shutdown is :infinity) generates for `module`, with
 * a `use` option restart: (nil for the default, :permanent). */
static term use_child_spec(term module, term arg, term restart, term type) {
    term shutdown = type == am_worker ? integer(DEFAULT_SHUTDOWN) : am_infinity;
    return map(5, am_id, module, am_start, tuple(3, module, am_start_link, list(1, arg)), am_restart,
               restart == am_nil ? am_permanent : restart, am_shutdown, shutdown, am_type, type);
}

//> agents
/* ==========================================================================
 * PART V — agents.md: "Simple state management with agents"
 * ==========================================================================
 */

/* --------------------------------------------------------------------------
 * agents.md — "The trouble with (mutable) state"
 * --------------------------------------------------------------------------
 * No Elixir value can change, so a value that many processes read and
 * update must live inside one process, and the others ask it by message.
 * That is all a process of Part III needs: a loop that receives a request,
 * answers from its state and loops with the new state.  Elixir packs the
 * usual shapes of that loop as Agent, GenServer and Task; the guide's
 * key-value store starts with the simplest.
 *
 * An Agent is a process that holds a value, the state, and runs the
 * functions you send it against that value.  In Elixir, Agent is a thin
 * layer over GenServer: the agent process runs Agent.Server, a GenServer
 * callback module whose callbacks apply the function from the request to
 * the state.  kv.c does the same, so an agent crashes, stops and reports
 * exactly as a GenServer does: the generic server is Part IV.
 */

/* --------------------------------------------------------------------------
 * agents.md — "Agents 101": the Agent module
 * -------------------------------------------------------------------------- */

/* Part V's atoms (I.3 says how atoms are declared). */
#define AGENT_ATOMS(X) X(update, "update") X(get_and_update, "get_and_update") \
    X(Agent, "Elixir.Agent") X(handle_call, "handle_call") \
    X(handle_cast, "handle_cast")
DECLARE_ATOMS(AGENT_ATOMS)

/* Agent.Server's callbacks.  A request carries the function to run. */

static term agent_init(term fun) { return tuple(2, am_ok, fun_call(fun, NULL)); }

/* What a request asks the agent to run against its state: a fun,
 * fun.(state); or, from the Agent.get/4 family, {module, function, args}:
 * apply(module, function, [state | args]).  Agent checks nothing in the
 * caller: a bad module, function or args fails here, in apply/3. */
static term agent_run(term fun, term state) {
    if (is_tuple(fun) && tuple_size(fun) == 3)
        return erlang_apply(elem(fun, 0), elem(fun, 1), cons(state, elem(fun, 2)));
    return fun_call(fun, state);
}

static term agent_handle_call(term request, term from, term state) {
    (void)from;
    term fun = is_tuple(request) && tuple_size(request) == 2 ? elem(request, 1) : NULL;
    if (fun && elem(request, 0) == am_get)
        return tuple(3, am_reply, agent_run(fun, state), state);
    if (fun && elem(request, 0) == am_update)
        return tuple(3, am_reply, am_ok, agent_run(fun, state));
    if (fun && elem(request, 0) == am_get_and_update) {
        term r = agent_run(fun, state); /* must be {reply, new_state} */
        if (is_tuple(r) && tuple_size(r) == 2) return tuple(3, am_reply, elem(r, 0), elem(r, 1));
        return tuple(3, am_stop, tuple(2, am_bad_return_value, r), state);
    }
    raise_error(function_clause_error(alias("Agent.Server"), am_handle_call, 3));
}

static term agent_handle_cast(term request, term state) {
    if (!is_tagged(request, am_cast, 2))
        raise_error(function_clause_error(alias("Agent.Server"), am_handle_cast, 2));
    return tuple(2, am_noreply, agent_run(elem(request, 1), state));
}

/* Agent's functions only take funs of the right arity (a guard in Elixir):
 * anything else is a FunctionClauseError in the caller. */
static term agent_fun(term fun, int arity, const char *function, int function_arity) {
    if (!is_function(fun) || fun->u.fun->arity != arity)
        raise_error(function_clause_error(am_Agent, atom(function), function_arity));
    return fun;
}

/* Agent.start_link/2 — {:ok, pid}; fun computes the initial state in the
 * new process.  opts: [name: atom], [timeout: ms]. */
API term agent_start_link(term fun, term opts) {
    return gen_start(alias("Agent.Server"), agent_fun(fun, 0, "start_link", 2), opts, true);
}

/* Agent.start/2 — the same, unlinked */
API term agent_start(term fun, term opts) {
    return gen_start(alias("Agent.Server"), agent_fun(fun, 0, "start", 2), opts, false);
}

/* Agent.get/3 — fun.(state), computed in the agent */
API term agent_get_timeout(term agent, term fun, term timeout) {
    return gen_server_call_timeout(agent, tuple(2, am_get, agent_fun(fun, 1, "get", 3)), timeout);
}

/* Agent.get/2 */
API term agent_get(term agent, term fun) {
    return agent_get_timeout(agent, fun, DEFAULT_TIMEOUT);
}

/* Agent.update/2 — the state becomes fun.(state); returns :ok */
API term agent_update(term agent, term fun) {
    return gen_server_call_timeout(agent, tuple(2, am_update, agent_fun(fun, 1, "update", 3)),
                                   DEFAULT_TIMEOUT);
}

/* Agent.get_and_update/2 — fun.(state) returns {reply, new_state} */
API term agent_get_and_update(term agent, term fun) {
    return gen_server_call_timeout(agent, tuple(2, am_get_and_update, agent_fun(fun, 1, "get_and_update", 3)),
                                   DEFAULT_TIMEOUT);
}

/* Agent.cast/2 — like update, without waiting; always :ok */
API term agent_cast(term agent, term fun) {
    return gen_server_cast(agent, tuple(2, am_cast, agent_fun(fun, 1, "cast", 2)));
}

/* Agent.get/4 — apply(module, function, [state | args]), computed in the
 * agent.  Unlike the fun forms, nothing is checked in the caller: a bad
 * {module, function, args} crashes the agent (agent_run, apply/3). */
API term agent_get_mfa(term agent, term module, term function, term args) {
    return gen_server_call_timeout(agent, tuple(2, am_get, tuple(3, module, function, args)),
                                   DEFAULT_TIMEOUT);
}

/* Agent.update/4 — the state becomes apply(module, function, [state | args]) */
API term agent_update_mfa(term agent, term module, term function, term args) {
    return gen_server_call_timeout(agent, tuple(2, am_update, tuple(3, module, function, args)),
                                   DEFAULT_TIMEOUT);
}

/* Agent.get_and_update/4 — apply(...) returns {reply, new_state} */
API term agent_get_and_update_mfa(term agent, term module, term function, term args) {
    return gen_server_call_timeout(agent, tuple(2, am_get_and_update, tuple(3, module, function, args)),
                                   DEFAULT_TIMEOUT);
}

/* Agent.cast/4 — like update/4, without waiting; always :ok */
API term agent_cast_mfa(term agent, term module, term function, term args) {
    return gen_server_cast(agent, tuple(2, am_cast, tuple(3, module, function, args)));
}

/* Agent.stop/3 — :ok once the agent has exited with `reason` */
API term agent_stop(term agent, term reason, term timeout) {
    return gen_server_stop(agent, reason, timeout);
}

/* Agent as a module children can name: {Agent, fun} starts an agent.
 * (Its entry in the code server's table, and Agent.Server's, are with
 * every module's, in Part IX.) */
static term agent_start_link_1(term fun) { return agent_start_link(fun, NIL); }

/* Agent.child_spec/1 (use GenServer, in Agent) */
static term agent_child_spec(term arg) {
    return map(2, am_id, am_Agent, am_start, tuple(3, am_Agent, am_start_link, list(1, arg)));
}

/* --------------------------------------------------------------------------
 * agents.md — "Agents 101": KV.Bucket
 * --------------------------------------------------------------------------
 * The bucket is an agent whose state is a map.  Each operation is a small
 * function sent to the agent: in Elixir, &Map.get(&1, key); here a C
 * function plus the one term it captures (struct fun_def, I.3).
 * `use Agent` gives KV.Bucket a child_spec/1 (IV.5): how to start it
 * under a supervisor, which is what start_supervised! reads.
 */

static term bucket_new(term env, term unused) {
    (void)env, (void)unused;
    return empty_map();
}
static term bucket_get(term key, term state) { return map_get(state, key, am_nil); }
static term bucket_put(term kv, term state) { return map_put(state, elem(kv, 0), elem(kv, 1)); }
static term bucket_pop(term key, term state) { return map_pop(state, key); }

static const struct fun_def bucket_new_fun = {"bucket_new", 0, "KV.Bucket.start_link/1", bucket_new};
static const struct fun_def bucket_get_fun = {"bucket_get", 1, "KV.Bucket.get/2", bucket_get};
static const struct fun_def bucket_put_fun = {"bucket_put", 1, "KV.Bucket.put/3", bucket_put};
static const struct fun_def bucket_pop_fun = {"bucket_pop", 1, "KV.Bucket.delete/2", bucket_pop};

/* KV.Bucket.start_link/1 — Agent.start_link(fn -> %{} end) */
API term kv_bucket_start_link(term opts) {
    (void)opts;
    return agent_start_link(fun_term(&bucket_new_fun, NIL), NIL);
}

/* KV.Bucket.get/2 — Agent.get(bucket, &Map.get(&1, key)) */
API term kv_bucket_get(term bucket, term key) { return agent_get(bucket, fun_term(&bucket_get_fun, key)); }

/* KV.Bucket.put/3 — Agent.update(bucket, &Map.put(&1, key, value)) */
API term kv_bucket_put(term bucket, term key, term value) {
    return agent_update(bucket, fun_term(&bucket_put_fun, tuple(2, key, value)));
}

/* retired at dynamic-supervisor/temporary: buckets become temporary
// KV.Bucket.child_spec/1 — what `use Agent` generates: a :permanent
// worker, restarted whenever it stops, as any child is by default.
API term kv_bucket_child_spec(term arg) { return use_child_spec(alias("KV.Bucket"), arg, am_nil, am_worker); }
*/

/* --------------------------------------------------------------------------
 * agents.md — "Test setup with ExUnit callbacks"
 * --------------------------------------------------------------------------
 * The guide's KV.BucketTest, its setup and "stores values by key", are in
 * kv_test.c, written as the guide writes them: the setup starts a bucket
 * and hands it to the test in the context map.
 */

/* --------------------------------------------------------------------------
 * agents.md — "Other agent actions"
 * --------------------------------------------------------------------------
 * Besides get and update, an agent can do both in one step: the function
 * returns {value for the caller, new state}.  Map.pop/2 has that shape.
 */

/* KV.Bucket.delete/2 — Agent.get_and_update(bucket, &Map.pop(&1, key)):
 * the value that was there, or nil */
API term kv_bucket_delete(term bucket, term key) {
    return agent_get_and_update(bucket, fun_term(&bucket_pop_fun, key));
}

/* --------------------------------------------------------------------------
 * agents.md — "Client/server in agents"
 * --------------------------------------------------------------------------
 * Only the fun's code (bucket_get, bucket_put, bucket_pop above) runs in
 * the agent process, the server; the rest of kv_bucket_get and friends
 * runs in the calling process, the client.  Whatever the fun does, every
 * other client of that bucket waits for: slow work belongs in the client.
 */

//> genservers
/* ==========================================================================
 * PART VI — genservers.md: "Client-server communication with GenServer"
 * ==========================================================================
 *
 * Buckets need names ("shopping"), but naming them with atoms would turn
 * user input into atoms, which are never freed (I.3).  So the guide writes
 * a registry: a GenServer that maps bucket names to bucket pids, starts
 * buckets on request and, once it monitors them, forgets the ones that
 * stop.  The generic server it runs on is Part IV; what is written here is
 * only what the guide writes: the callbacks and the client functions.
 */

/* Part VI's atoms: the registry's requests (I.3 says how atoms are declared). */
#define REGISTRY_ATOMS(X) X(lookup, "lookup") X(create, "create")
DECLARE_ATOMS(REGISTRY_ATOMS)

/* --------------------------------------------------------------------------
 * genservers.md — "GenServer callbacks": KV.Registry's callbacks
 * --------------------------------------------------------------------------
 * The registry's three callbacks: init/1, handle_call/3 for lookups and
 * handle_cast/2 for creates.  KV.Registry's entry in the code server's
 * table, which names them, is in Part IX.
 * "The need for monitoring", below, writes all three again.    //> genservers/monitoring
 */

/* retired at genservers/monitoring: the registry starts to monitor its buckets
// The first version keeps one map, name => bucket pid, as its state.
//
// init(:ok): the state is a map of names to bucket pids
static term kv_registry_init(term arg) {
    (void)arg;
    return tuple(2, am_ok, empty_map());
}

// handle_call({:lookup, name}, _from, names): {:reply, Map.fetch(names, name), names}
static term kv_registry_handle_call(term request, term from, term names) {
    (void)from;
    if (!is_tagged(request, am_lookup, 2))
        raise_error(function_clause_error(alias("KV.Registry"), am_handle_call, 3));
    return tuple(3, am_reply, map_fetch(names, elem(request, 1)), names);
}

// handle_cast({:create, name}, names): a new bucket, unless the name is taken
static term kv_registry_handle_cast(term request, term names) {
    if (!is_tagged(request, am_create, 2))
        raise_error(function_clause_error(alias("KV.Registry"), am_handle_cast, 2));
    term name = elem(request, 1);
    if (map_has_key(names, name)) return tuple(2, am_noreply, names);
    term bucket = ok_value(kv_bucket_start_link(NIL));
    return tuple(2, am_noreply, map_put(names, name, bucket));
}
*/

/* --------------------------------------------------------------------------
 * genservers.md — "The Client API": KV.Registry's
 * -------------------------------------------------------------------------- */

/* KV.Registry.start_link/1 — GenServer.start_link(__MODULE__, :ok, opts) */
API term kv_registry_start_link(term opts) { return gen_server_start_link(alias("KV.Registry"), am_ok, opts); }

/* KV.Registry.lookup/2 — {:ok, pid} if the bucket exists, :error otherwise */
API term kv_registry_lookup(term server, term name) {
    return gen_server_call(server, tuple(2, am_lookup, name));
}

/* KV.Registry.create/2 — ensures there is a bucket for name (a cast: :ok at once) */
API term kv_registry_create(term server, term name) {
    return gen_server_cast(server, tuple(2, am_create, name));
}

/* KV.Registry.child_spec/1 — what `use GenServer` generates (IV.5) */
API term kv_registry_child_spec(term arg) { return use_child_spec(alias("KV.Registry"), arg, am_nil, am_worker); }

/* --------------------------------------------------------------------------
 * genservers.md — "Testing a GenServer"
 * --------------------------------------------------------------------------
 * The guide's test, "spawns buckets", is in kv_test.c (KV.RegistryTest),
 * with start_supervised! as the guide writes it.
 */

//> genservers/monitoring
/* --------------------------------------------------------------------------
 * genservers.md — "The need for monitoring"
 * --------------------------------------------------------------------------
 * A stopped bucket's name stayed in the registry: the guide's test
 * "removes buckets on exit" (in kv_test.c) fails against the first
 * callbacks (`make flaw-unmonitored` in chapters/2-genservers shows it
 * failing).  So the callbacks are written again: the state becomes a pair of maps, {names,
 * refs}: name => bucket pid, and monitor ref => name; handle_cast monitors
 * every bucket it starts.  When a monitored bucket goes down, the
 * registry receives {:DOWN, ref, :process, pid, reason}, which is neither a
 * call nor a cast, so handle_info/2 gets it, and the ref finds the name to
 * forget.  The client API did not change at all.
 */

/* init(:ok): {names, refs}, both empty */
static term kv_registry_init(term arg) {
    (void)arg;
    return tuple(2, am_ok, tuple(2, empty_map(), empty_map()));
}

/* handle_call({:lookup, name}, _from, state): {:reply, Map.fetch(names, name), state}.
 * Any other request matches no clause: FunctionClauseError, and the
 * registry crashes (supervisor-and-application.md sends it :bad_input to
 * crash it on purpose). */
static term kv_registry_handle_call(term request, term from, term state) {
    (void)from;
    if (!is_tagged(request, am_lookup, 2))
        raise_error(function_clause_error(alias("KV.Registry"), am_handle_call, 3));
    term names = elem(state, 0);
    return tuple(3, am_reply, map_fetch(names, elem(request, 1)), state);
}

/* retired at dynamic-supervisor/bucket-supervisor: buckets start under KV.BucketSupervisor
// handle_cast({:create, name}, {names, refs}): start a bucket unless the
// name is taken, monitor it, remember it under both maps.  The bucket is
// started with KV.Bucket.start_link: linked to the registry.
static term kv_registry_handle_cast(term request, term state) {
    if (!is_tagged(request, am_create, 2))
        raise_error(function_clause_error(alias("KV.Registry"), am_handle_cast, 2));
    term name = elem(request, 1), names = elem(state, 0), refs = elem(state, 1);
    if (map_has_key(names, name)) return tuple(2, am_noreply, state);
    term bucket = ok_value(kv_bucket_start_link(NIL));
    term ref = process_monitor(bucket);
    refs = map_put(refs, ref, name);
    names = map_put(names, name, bucket);
    return tuple(2, am_noreply, tuple(2, names, refs));
}
*/

/* handle_info({:DOWN, ref, ...}, state): forget the bucket that stopped;
 * any other message is logged and ignored (see the next section). */
static term kv_registry_handle_info(term msg, term state) {
    if (is_tagged(msg, am_DOWN, 5)) {
        term popped = map_pop(elem(state, 1), elem(msg, 1)); /* {name, refs} */
        term names = map_delete(elem(state, 0), elem(popped, 0));
        return tuple(2, am_noreply, tuple(2, names, elem(popped, 1)));
    }
    struct buf b = {0};
    buf_puts(&b, "Unexpected message in KV.Registry: ");
    inspect_to(&b, msg);
    logger_log(LOG_DEBUG, buf_str(&b));
    buf_free(&b);
    return tuple(2, am_noreply, state);
}

/* --------------------------------------------------------------------------
 * genservers.md — "call, cast or info?"
 * --------------------------------------------------------------------------
 * Which callback a message reaches depends only on how it was sent:
 * GenServer.call arrives as {:"$gen_call", from, request} and goes to
 * handle_call; GenServer.cast as {:"$gen_cast", request}, to handle_cast;
 * anything else (send/2, a monitor's :DOWN, a timer) to handle_info (see
 * gen_server_handle, IV.2).  Only handle_info can receive what nobody
 * planned for, which is why the registry's handle_info ends with a clause
 * that logs and ignores the message: a stray message must not crash it.
 * Calls and casts come only through the registry's own client API, so an
 * unknown one is a bug, and the FunctionClauseError it raises is the
 * right answer.
 */

/* --------------------------------------------------------------------------
 * genservers.md — "Monitors or links?"
 * --------------------------------------------------------------------------
 * In this chapter the registry starts each bucket with KV.Bucket.start_link/1,
 * which links the bucket to the registry *and* monitors it.  The guide
 * points out the flaw: a bucket's crash then takes the registry down too.
 * It comes back to it in dynamic-supervisor.md.
 */

//> supervisor-and-application
/* ==========================================================================
 * PART VII — supervisor-and-application.md: "Supervision trees and applications"
 * ==========================================================================
 *
 * A supervisor starts its children, restarts them when they crash, and
 * shuts them down.  In OTP a supervisor is itself a gen_server (the module
 * `supervisor` implements gen_server's callbacks) that traps exits: a
 * child's death reaches it as an {:EXIT, pid, reason} message in
 * handle_info, and the supervisor decides what to do from the child's
 * specification and its own strategy.  kv.c builds it the same way, on
 * Part IV's generic server.  The guide uses it through Elixir's
 * Supervisor module and takes the engine for granted; OTP's side comes
 * first here, then the guide's sections: KV.Supervisor, names, and the
 * applications that start a supervision tree.
 */

/* Part VII's atoms: the supervisor's and the applications' (I.3 says how atoms are declared). */
#define SUPERVISOR_ATOMS(X) X(modules, "modules") X(transient, "transient") X(supervisor, "supervisor") \
    X(temporary, "temporary") X(brutal_kill, "brutal_kill") X(strategy, "strategy") \
    X(one_for_one, "one_for_one") X(one_for_all, "one_for_all") X(rest_for_one, "rest_for_one") \
    X(intensity, "intensity") X(period, "period") X(max_restarts, "max_restarts") \
    X(max_seconds, "max_seconds") X(children, "children") X(pid, "pid") X(restarts, "restarts") \
    X(restarting, "restarting") X(child, "child") X(running, "running") X(not_found, "not_found") \
    X(already_present, "already_present") X(which_children, "which_children") \
    X(count_children, "count_children") X(start_child, "start_child") \
    X(terminate_child, "terminate_child") X(restart_child, "restart_child") \
    X(delete_child, "delete_child") X(start_spec, "start_spec") \
    X(supervisor_data, "supervisor_data") X(bad_start_spec, "bad_start_spec") \
    X(duplicate_child_name, "duplicate_child_name") X(bad_return, "bad_return") \
    X(child_spec, "child_spec") X(failed_to_start_child, "failed_to_start_child") \
    X(active, "active") X(specs, "specs") X(supervisors, "supervisors") X(workers, "workers") \
    X(dynamic, "dynamic") X(started, "started") X(kv, "kv") X(logger, "logger") \
    X(try_again_restart, "try_again_restart") X(not_started, "not_started") \
    X(missing_id, "missing_id") X(missing_start, "missing_start") \
    X(invalid_strategy, "invalid_strategy") X(invalid_child_spec, "invalid_child_spec") \
    X(app_started, "app_started") X(app_exited, "app_exited") \
    X(application_controller, "application_controller") X(get_childspec, "get_childspec")
DECLARE_ATOMS(SUPERVISOR_ATOMS)

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — OTP's side of "Our first supervisor": child specs
 * --------------------------------------------------------------------------
 * A child specification is a map:
 *
 *     %{id: KV.Registry,                             any term naming the child
 *       start: {KV.Registry, :start_link, [[]]},      how to start it: apply/3
 *       restart: :permanent,    when to restart: :permanent (always),
 *                               :transient (after an abnormal exit only),
 *                               :temporary (never)
 *       shutdown: 5000,         how to stop it: send :shutdown and wait this
 *                               many ms before :kill; or :brutal_kill
 *                               (:kill at once); or :infinity
 *       type: :worker}          or :supervisor
 *
 * `use GenServer` (and Agent, and Supervisor) defines child_spec/1 for the
 * module (IV.5).  Editions of the guide print it differently: an older
 * one (the seed this project began from) shows the full map above, as the
 * Elixir of its day generated it, and the guide today shows
 * %{id: ..., start: ...}: newer Elixir (1.14 among them) writes only id
 * and start, plus type: :supervisor for a supervisor, plus whatever
 * options were given to `use` (`use Agent, restart: :temporary`, say),
 * and lets the supervisor fill in the rest.  kv.c generates the full map;
 * child_spec_as_1_14() gives the newer form of the same spec.
 */

/* The same spec as Elixir 1.14's `use` writes it.  1.14 leaves out what
 * `use` was not given, except a supervisor's type; kv.c's modules give
 * `use` nothing but a restart that is not :permanent, so dropping the
 * keys that hold a worker's defaults (a supervisor's shutdown too) gives
 * the same map. */
API term child_spec_as_1_14(term spec) {
    term type = map_get(spec, am_type, am_worker);
    term shutdown = type == am_supervisor ? am_infinity : integer(DEFAULT_SHUTDOWN);
    if (type == am_worker) spec = map_delete(spec, am_type);
    if (map_get(spec, am_restart, NULL) == am_permanent) spec = map_delete(spec, am_restart);
    term s = map_get(spec, am_shutdown, NULL);
    if (s && term_eq(s, shutdown)) spec = map_delete(spec, am_shutdown);
    return spec;
}

/* What Supervisor.init/2 and child_spec/2 say of a child in no known form. */
static NORETURN void raise_not_a_child(term child) {
    raise_argument_error("supervisors expect each child to be one of the following:\n\n"
                         "  * a module\n  * a {module, arg} tuple\n  * a child specification as a map "
                         "with at least the :id and :start fields\n  * or a tuple with 6 elements "
                         "generated by Supervisor.Spec (deprecated)\n\nGot: %T\n", child);
}

/* Erlang's own child spec, {id, {m, f, a}, restart, shutdown, type,
 * modules}: Supervisor takes it as it is (Supervisor.init/2 and
 * start_child let it through), and checks it as it checks a map. */
static bool is_erlang_child_spec(term t) { return is_tuple(t) && tuple_size(t) == 6; }

static term erlang_child_spec_map(term t) {
    return map(6, am_id, elem(t, 0), am_start, elem(t, 1), am_restart, elem(t, 2), am_shutdown, elem(t, 3),
                  am_type, elem(t, 4), am_modules, elem(t, 5));
}

/* Supervisor.child_spec/2: a child spec from a module (KV.Registry means
 * KV.Registry.child_spec([])), a {module, arg} pair (module.child_spec(arg))
 * or a map, with `overrides` ([restart: :temporary], ...) applied. */
API term supervisor_child_spec(term child, term overrides) {
    term spec = child;
    if (is_atom(child) || (is_tuple(child) && tuple_size(child) == 2 && is_atom(elem(child, 0)))) {
        term module = is_atom(child) ? child : elem(child, 0);
        term arg = is_atom(child) ? NIL : elem(child, 1);
        const struct module *m = code_find(module);
        if (!m) raise_argument_error("The module %T was given as a child to a supervisor but it does not exist.", module);
        bool has = false;
        for (const struct export *e = m->exports; e && e->name; e++)
            has = has || (e->arity == 1 && strcmp(e->name, "child_spec") == 0);
        if (!has)
            raise_argument_error("The module %T was given as a child to a supervisor\nbut it does not "
                                 "implement child_spec/1.", module);
        spec = erlang_apply(module, am_child_spec, list(1, arg));
    } else if (is_tuple(child) && tuple_size(child) == 6) {
        raise_argument_error("old tuple-based child specification %T is not supported in "
                             "Supervisor.child_spec/2", child);
    } else if (!is_map(child)) {
        raise_not_a_child(child);
    }
    static const char *const keys[] = {"id", "start", "restart", "shutdown", "type", "modules", "significant", NULL};
    for (term o = overrides; o->kind == K_CONS; o = tl(o)) {
        term key = is_tuple(hd(o)) && tuple_size(hd(o)) == 2 ? elem(hd(o), 0) : hd(o);
        bool known = false;
        for (size_t i = 0; keys[i]; i++) known = known || key == atom(keys[i]);
        if (!known) raise_argument_error("unknown key %T in child specification override", key);
        spec = map_put(spec, key, elem(hd(o), 1));
    }
    return spec;
}

/* Check a child spec the way OTP's supervisor does, and fill in the
 * defaults.  Returns the child as the supervisor keeps it (the spec plus
 * pid: :undefined) or {:error, reason}. */
static term child_check(term spec) {
    if (is_erlang_child_spec(spec)) spec = erlang_child_spec_map(spec);
    if (!is_map(spec)) return tuple(2, am_error, tuple(2, am_invalid_child_spec, spec));
    term id = map_get(spec, am_id, NULL), start = map_get(spec, am_start, NULL);
    if (!id) return tuple(2, am_error, am_missing_id);
    if (!start) return tuple(2, am_error, am_missing_start);
    if (!is_tuple(start) || tuple_size(start) != 3 || !is_atom(elem(start, 0)) || !is_atom(elem(start, 1)) ||
        !is_list(elem(start, 2)))
        return tuple(2, am_error, tuple(2, atom("invalid_mfa"), start));
    term restart = map_get(spec, am_restart, am_permanent);
    if (restart != am_permanent && restart != am_transient && restart != am_temporary)
        return tuple(2, am_error, tuple(2, atom("invalid_restart_type"), restart));
    term type = map_get(spec, am_type, am_worker);
    if (type != am_worker && type != am_supervisor)
        return tuple(2, am_error, tuple(2, atom("invalid_child_type"), type));
    term shutdown = map_get(spec, am_shutdown, type == am_worker ? integer(DEFAULT_SHUTDOWN) : am_infinity);
    if (!(shutdown == am_infinity || shutdown == am_brutal_kill || (is_integer(shutdown) && int_value(shutdown) >= 0)))
        return tuple(2, am_error, tuple(2, atom("invalid_shutdown"), shutdown));
    term modules = map_get(spec, am_modules, list(1, elem(start, 0)));
    if (modules != am_dynamic && !is_proper_list(modules))
        return tuple(2, am_error, tuple(2, atom("invalid_modules"), modules));
    for (term l = modules; modules != am_dynamic && l->kind == K_CONS; l = tl(l))
        if (!is_atom(hd(l))) return tuple(2, am_error, tuple(2, atom("invalid_module"), hd(l)));
    return map(7, am_id, id, am_start, start, am_restart, restart, am_shutdown, shutdown, am_type, type,
                  am_modules, modules, am_pid, am_undefined);
}

/* ---- How a supervisor's exit reasons are worded ----------------------
 * (Exception.format_exit's words for them; a first reading may skip this.)
 * A supervisor's complaint about a child spec ({:start_spec, what}) or
 * about its own flags ({:supervisor_data, what}): what = {tag, value}
 * becomes before <> inspect(value) <> after. */
struct exit_words {
    const char *tag, *before, *after;
};

static const struct exit_words start_spec_words[] = {
    {"invalid_child_spec", "invalid child specification: ", ""},
    {"invalid_child_type", "invalid child type: ", ". Must be :worker or :supervisor."},
    {"invalid_mfa", "invalid mfa: ", ""},
    {"invalid_restart_type", "invalid restart type: ", ". Must be :permanent, :transient or :temporary."},
    {"invalid_shutdown", "invalid shutdown: ", ". Must be an integer >= 0, :infinity or :brutal_kill."},
    {"invalid_module", "invalid module: ", ". Must be an atom."},
    {"invalid_modules", "invalid modules: ", ". Must be a list of atoms or :dynamic."},
    {NULL, NULL, NULL},
};

static const struct exit_words supervisor_data_words[] = {
    {"invalid_type", "invalid type: ", ""},
    {"invalid_strategy", "invalid strategy: ", ""},
    {"invalid_intensity", "invalid max_restarts (intensity): ", ""},
    {"invalid_period", "invalid max_seconds (period): ", ""},
    {"invalid_max_children", "invalid max_children: ", ""},
    {"invalid_extra_arguments", "invalid extra_arguments: ", ""},
    {NULL, NULL, NULL},
};

static void exit_words_to(struct buf *b, const struct exit_words *w, term what) {
    for (; w->tag; w++) {
        if (!is_tagged(what, atom(w->tag), 2)) continue;
        buf_puts(b, w->before);
        inspect_to(b, elem(what, 1));
        buf_puts(b, w->after);
        return;
    }
    buf_puts(b, "got: "); /* anything else, e.g. :missing_id */
    inspect_to(b, what);
}

/* {:start_spec, what}: two ids alike get a whole paragraph of advice. */
static void start_spec_text(struct buf *b, term what) {
    buf_puts(b, "bad child specification, ");
    if (!is_tagged(what, am_duplicate_child_name, 2)) {
        exit_words_to(b, start_spec_words, what);
        return;
    }
    buf_puts(b, "more than one child specification has the id: ");
    inspect_to(b, elem(what, 1));
    buf_puts(b, ".\nIf using maps as child specifications, make sure the :id keys are unique.\n"
                "If using a module or {module, arg} as child, use Supervisor.child_spec/2 to change "
                "the :id, for example:\n\n    children = [\n"
                "      Supervisor.child_spec({MyWorker, arg}, id: :my_worker_1),\n"
                "      Supervisor.child_spec({MyWorker, arg}, id: :my_worker_2)\n    ]\n");
}

/* The supervisor's exit reasons, as Exception.format_exit words them. */
static bool supervisor_exit_wording(struct buf *b, term reason, const char *joiner) {
    term what = is_tuple(reason) && tuple_size(reason) == 2 ? elem(reason, 1) : NULL;
    if (is_tagged(reason, am_shutdown, 2) && is_tagged(what, am_failed_to_start_child, 3)) {
        term why = elem(what, 2); /* {:shutdown, {:failed_to_start_child, id, why}} */
        if (is_tagged(why, am_EXIT, 2)) why = elem(why, 1);
        buf_puts(b, "shutdown: failed to start child: ");
        inspect_to(b, elem(what, 1));
        format_exit_nested(b, why, joiner);
    } else if (is_tagged(reason, am_bad_return, 2) && is_tuple(what) && tuple_size(what) == 3 &&
               is_atom(elem(what, 0)) && elem(what, 1) == am_init) {
        mfa_text(b, elem(what, 0), am_init, 1); /* {:bad_return, {Sup, :init, value}} */
        buf_puts(b, " returned a bad value: ");
        inspect_to(b, elem(what, 2));
    } else if (is_tagged(reason, am_bad_start_spec, 2)) {
        buf_puts(b, "bad child specification, invalid children: ");
        inspect_to(b, what);
    } else if (is_tagged(reason, am_start_spec, 2)) {
        start_spec_text(b, what);
    } else if (is_tagged(reason, am_supervisor_data, 2)) {
        buf_puts(b, "bad supervisor configuration, ");
        exit_words_to(b, supervisor_data_words, what);
    } else {
        return false;
    }
    return true;
}

/* OTP's internal child record, as start_child errors show it:
 * {:child, :undefined, id, mfa, restart, significant, shutdown, type, modules} */
static term child_record(term child) {
    term items[9] = {am_child, am_undefined, map_get(child, am_id, am_nil), map_get(child, am_start, am_nil),
                     map_get(child, am_restart, am_nil), am_false, map_get(child, am_shutdown, am_nil),
                     map_get(child, am_type, am_nil), map_get(child, am_modules, am_nil)};
    return tuple_of(9, items);
}

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — OTP's side of "Our first supervisor": the supervisor
 * --------------------------------------------------------------------------
 * What OTP's supervisor does, in the order it does it:
 *
 *   1. init: trap exits; call the module's init/1 for the flags and the
 *      child specs; check them all; start the children one at a time, in
 *      list order, each one's start function returning before the next
 *      starts.  A child that fails to start stops the start: the ones
 *      already running are shut down again, newest first, and the
 *      supervisor's start fails with {:shutdown, {:failed_to_start_child,
 *      id, reason}}.
 *   2. run: a child's death arrives as {:EXIT, pid, reason}.  Whether it
 *      is restarted depends on its restart type and its exit reason:
 *
 *          restart       :normal, :shutdown,           any other reason
 *                        {:shutdown, _}
 *          :permanent    restarted                     restarted
 *          :transient    kept, not running             restarted
 *          :temporary    forgotten                     forgotten
 *
 *      and which other children go with it depends on the strategy
 *      (sup_restart_group, below): none (:one_for_one), the ones started
 *      after it (:rest_for_one), or all (:one_for_all).
 *   3. give up: each restart is noted with its time; more than
 *      `intensity` restarts within `period` seconds, and the supervisor
 *      shuts every child down and exits with :shutdown, so that its own
 *      supervisor can decide (restart intensity).
 *   4. stop: children are shut down one at a time, newest first, each as
 *      its spec says: :shutdown then :kill after `shutdown` ms, or :kill
 *      at once (:brutal_kill), or :shutdown and wait (:infinity).
 *
 * The supervisor's state is a map:
 *
 *     %{module: KV.Supervisor, strategy: :one_for_one, intensity: 3,
 *       period: 5, restarts: [seconds...], children: [child, ...]}
 *
 * with the children in start order, each one its checked spec plus the
 * current pid (or :undefined when it is not running, :restarting while a
 * restart is being retried).
 */

/* {:ok, x} or {:ok, x, info}: what a start function returns on success */
static bool is_ok_tuple(term t) { return is_tagged(t, am_ok, 2) || is_tagged(t, am_ok, 3); }

/* ...with a pid for x: a started process */
static bool is_started(term t) { return is_ok_tuple(t) && is_pid(elem(t, 1)); }

static term child_get(term child, term key) { return map_get(child, key, am_nil); }
static term sup_get(term st, term key) { return map_get(st, key, am_nil); }

/* apply(m, f, a) for try_catch, which takes a function and a pointer. */
struct apply_run {
    term mfa, result;
};

static void apply_mfa(void *arg) {
    struct apply_run *r = arg;
    r->result = erlang_apply(elem(r->mfa, 0), elem(r->mfa, 1), elem(r->mfa, 2));
}

/* Start one child with its start function.  Never raises: as OTP's
 * `catch apply(M, F, A)`, a raise comes back as {:error, {:EXIT, {e, []}}}.
 * Returns {:ok, pid}, {:ok, pid, info}, {:ok, :undefined} (:ignore) or
 * {:error, reason}. */
static term child_start(term child) {
    struct apply_run r = {child_get(child, am_start), NULL};
    term caught, what;
    switch (try_catch(apply_mfa, &r, &caught)) {
    case CAUGHT_NOTHING: what = r.result; break;
    case CAUGHT_ERROR: what = tuple(2, am_EXIT, tuple(2, caught, NIL)); break;
    case CAUGHT_EXIT: what = tuple(2, am_EXIT, caught); break;
    default: what = caught; break;
    }
    if (is_started(what)) return what;
    if (what == am_ignore) return tuple(2, am_ok, am_undefined);
    if (is_tagged(what, am_error, 2)) return what;
    return tuple(2, am_error, what);
}

static bool match_down_of(term msg, const void *mref) {
    return is_tagged(msg, am_DOWN, 5) && term_eq(elem(msg, 1), (term)mref);
}

/* Stop one running child the way its spec says (OTP's shutdown/2):
 * monitor it, unlink it (taking an EXIT that may already be waiting), then
 * :kill at once for :brutal_kill; otherwise :shutdown, and :kill if it is
 * not gone within the shutdown time.  Waits until it is gone. */
static void child_shutdown(term child) {
    term pid = child_get(child, am_pid);
    if (!is_pid(pid)) return;
    term mref = process_monitor(pid);
    process_unlink(pid);
    if (receive_now(is_exit_from, pid)) { /* it died already */
        receive_forever(match_down_of, mref);
        return;
    }
    term shutdown = child_get(child, am_shutdown);
    if (shutdown == am_brutal_kill) {
        process_exit(pid, am_kill);
        receive_forever(match_down_of, mref);
        return;
    }
    process_exit(pid, am_shutdown);
    int64_t wait = shutdown == am_infinity ? NO_TIMEOUT : int_value(shutdown);
    if (!receive_full(match_down_of, mref, wait, "a child to shut down:", pid)) {
        process_exit(pid, am_kill); /* too slow */
        receive_forever(match_down_of, mref);
    }
}

/* Stop running children in reverse start order.  Temporary children are
 * then forgotten, the others kept with pid :undefined.  Each child_shutdown
 * waits, and the supervisor may be killed during any of those waits, so
 * the newest-first order is a list in its own heap, not a malloc'd array:
 * whatever a process holds across a wait must be freed by its death. */
static term children_shutdown(term children) {
    term newest_first = NIL;
    for (term l = children; l->kind == K_CONS; l = tl(l)) newest_first = cons(hd(l), newest_first);
    for (term l = newest_first; l->kind == K_CONS; l = tl(l)) child_shutdown(hd(l));
    term kept = NIL; /* back in start order */
    for (term l = newest_first; l->kind == K_CONS; l = tl(l))
        if (child_get(hd(l), am_restart) != am_temporary) kept = cons(map_put(hd(l), am_pid, am_undefined), kept);
    return kept;
}

static term child_by(term children, term key, term value) {
    for (term l = children; l->kind == K_CONS; l = tl(l))
        if (term_eq(child_get(hd(l), key), value)) return hd(l);
    return NULL;
}

/* children, with the child whose id is `id` replaced by `child` (or
 * removed, when child is NULL). */
static term children_replace(term children, term id, term child) {
    struct list_builder r;
    list_builder_init(&r);
    for (term l = children; l->kind == K_CONS; l = tl(l)) {
        if (!term_eq(child_get(hd(l), am_id), id)) list_builder_add(&r, hd(l));
        else if (child) list_builder_add(&r, child);
    }
    return list_builder_done(&r, NIL);
}

/* Restart intensity, as OTP counts it: note this restart's time in whole
 * seconds (erlang:monotonic_time(:second)), forget those older than the
 * period, and say whether more than `intensity` remain: time to give up.
 *
 * OTP keeps one time per restart and walks them all at every restart, so
 * under a high intensity each restart costs more than the one before.
 * The times are whole seconds, though, so kv.c keeps one {second, count}
 * pair per second instead, newest first: [{12, 3}, {10, 1}] is three
 * restarts in second 12 and one in second 10.  A restart then walks at
 * most period + 1 pairs, however many restarts they count. */
static bool add_restart(term *st) {
    int64_t now = now_ms() / 1000, period = int_value(sup_get(*st, am_period));
    term times = sup_get(*st, am_restarts);
    term newest = times->kind == K_CONS && int_value(elem(hd(times), 0)) == now ? hd(times) : NULL;
    term older = newest ? tl(times) : times;
    int64_t count = 1 + (newest ? int_value(elem(newest, 1)) : 0);
    struct list_builder kept;
    list_builder_init(&kept);
    list_builder_add(&kept, tuple(2, integer(now), integer(count)));
    for (term l = older; l->kind == K_CONS && now <= int_value(elem(hd(l), 0)) + period; l = tl(l)) {
        list_builder_add(&kept, hd(l));
        count += int_value(elem(hd(l), 1));
    }
    *st = map_put(*st, am_restarts, list_builder_done(&kept, NIL));
    return count > int_value(sup_get(*st, am_intensity));
}

/* Start, in order, those of `children` that are not running.  At the first
 * failure the rest are left unstarted; *out gets every child, started or
 * not, and the failed child's id is returned (its reason in *failure).
 * NULL: all started. */
static term children_start(term children, term *out, term *failure) {
    term failed_id = NULL;
    struct list_builder started;
    list_builder_init(&started);
    for (term l = children; l->kind == K_CONS; l = tl(l)) {
        term c = hd(l);
        if (!failed_id && !is_pid(child_get(c, am_pid))) {
            term r = child_start(c);
            if (is_ok_tuple(r)) {
                if (elem(r, 1) == am_undefined && child_get(c, am_restart) == am_temporary) continue;
                c = map_put(c, am_pid, elem(r, 1));
            } else {
                failed_id = child_get(c, am_id);
                if (failure) *failure = elem(r, 1);
            }
        }
        list_builder_add(&started, c);
    }
    *out = list_builder_done(&started, NIL);
    return failed_id;
}

/* Which children a restart takes with it, by strategy.  The children, in
 * start order, are cut in three: `before` and `after` go on running, and
 * `group` is stopped and started again.  With c the one that died:
 *
 *     children, in start order:   a   b   c   d
 *
 *     :one_for_one     before [a, b]   group [c]             after [d]
 *     :rest_for_one    before [a, b]   group [c, d]          after []
 *     :one_for_all     before []       group [a, b, c, d]    after []
 *
 * sup_restart then stops the group's running members newest first (d, b,
 * a; c is dead already), and starts the group again oldest first (a, b,
 * c, d), so the order children depend on each other in is kept; a
 * :temporary member that was stopped on the way is not started again
 * (as OTP 25 does). */
static void sup_restart_group(term children, term strategy, term id, term *before, term *group, term *after) {
    struct list_builder b, g, a;
    list_builder_init(&b), list_builder_init(&g), list_builder_init(&a);
    bool seen = false;
    for (term l = children; l->kind == K_CONS; l = tl(l)) {
        bool it = term_eq(child_get(hd(l), am_id), id);
        seen = seen || it;
        if (it || strategy == am_one_for_all || (strategy == am_rest_for_one && seen)) list_builder_add(&g, hd(l));
        else list_builder_add(seen ? &a : &b, hd(l));
    }
    *before = list_builder_done(&b, NIL);
    *group = list_builder_done(&g, NIL);
    *after = list_builder_done(&a, NIL);
}

/* A child died (or its restart failed and is tried again): restart it, and
 * the rest of its group, updating *state.  Returns false when the restart
 * intensity is exceeded and the supervisor must shut down.  A start that
 * fails leaves that child :restarting and asks for another try with a
 * cast to itself, as OTP does: every attempt counts towards the
 * intensity, and other messages are handled in
 * between. */
static bool sup_restart(term *state, term child) {
    term st = *state;
    if (add_restart(&st)) {
        *state = st;
        return false;
    }
    term before, group, after, restarted;
    sup_restart_group(sup_get(st, am_children), sup_get(st, am_strategy), child_get(child, am_id), &before, &group,
                      &after);
    group = children_shutdown(group);
    term failed = children_start(group, &restarted, NULL);
    term children = list_concat(before, list_concat(restarted, after));
    if (failed) {
        term c = map_put(child_by(children, am_id, failed), am_pid, am_restarting);
        children = children_replace(children, failed, c);
        gen_server_cast(self(), tuple(2, am_try_again_restart, failed));
    }
    *state = map_put(st, am_children, children);
    return true;
}

/* A child has exited with `reason`: restart it or not, by its restart
 * type.  Returns false if the supervisor must now shut down. */
static bool sup_child_exited(term *st, term child, term reason) {
    term children = sup_get(*st, am_children), restart = child_get(child, am_restart);
    term id = child_get(child, am_id);
    if (restart == am_temporary) {
        *st = map_put(*st, am_children, children_replace(children, id, NULL));
        return true;
    }
    if (restart == am_transient && is_normal_exit(reason)) {
        *st = map_put(*st, am_children, children_replace(children, id, map_put(child, am_pid, am_undefined)));
        return true;
    }
    /* The dead child is no longer running, whatever happens next. */
    child = map_put(child, am_pid, am_undefined);
    *st = map_put(*st, am_children, children_replace(children, id, child));
    return sup_restart(st, child);
}

/* The flags a supervisor's init/1 returned, in either form OTP takes: a
 * map, whose missing keys get :supervisor's own defaults (:one_for_one,
 * intensity 1, period 5; Supervisor.init/2 fills in Elixir's 3 and 5),
 * or the older tuple {strategy, intensity, period}.  Returns NULL and sets
 * the three, or the reason they are refused: {:invalid_type, flags} for
 * anything else, {:invalid_strategy, s}, ... (kv.c has no
 * :simple_one_for_one: it is refused as an invalid strategy.) */
static term sup_flags(term flags, term *strategy, term *intensity, term *period) {
    if (is_tuple(flags) && tuple_size(flags) == 3) {
        *strategy = elem(flags, 0), *intensity = elem(flags, 1), *period = elem(flags, 2);
    } else if (is_map(flags)) {
        *strategy = map_get(flags, am_strategy, am_one_for_one);
        *intensity = map_get(flags, am_intensity, integer(1));
        *period = map_get(flags, am_period, integer(5));
    } else {
        return tuple(2, atom("invalid_type"), flags);
    }
    if (*strategy != am_one_for_one && *strategy != am_one_for_all && *strategy != am_rest_for_one)
        return tuple(2, am_invalid_strategy, *strategy);
    if (!is_integer(*intensity) || int_value(*intensity) < 0) return tuple(2, atom("invalid_intensity"), *intensity);
    if (!is_integer(*period) || int_value(*period) < 1) return tuple(2, atom("invalid_period"), *period);
    return NULL;
}

/* The supervisor's init (step 1 above): trap exits, ask the module for its
 * flags and children, check them, and start the children one by one, in
 * order.  A child that fails to start stops everything: the ones already
 * started are shut down again. */
static term sup_init(term arg) {
    process_flag_trap_exit(true);
    term module = elem(arg, 0);
    const struct module *code;
    term r = behaviour_init(module, elem(arg, 1), &code);
    if (r == am_ignore) return am_ignore;
    if (!is_tagged(r, am_ok, 2) || !is_tuple(elem(r, 1)) || tuple_size(elem(r, 1)) != 2)
        return tuple(2, am_stop, tuple(2, am_bad_return, tuple(3, module, am_init, r)));
    term flags = elem(elem(r, 1), 0), specs = elem(elem(r, 1), 1);
    term strategy = NULL, intensity = NULL, period = NULL;
    term bad = sup_flags(flags, &strategy, &intensity, &period);
    if (bad) return tuple(2, am_stop, tuple(2, am_supervisor_data, bad));
    if (!is_proper_list(specs)) return tuple(2, am_stop, tuple(2, am_bad_start_spec, specs));
    struct list_builder checked;
    list_builder_init(&checked);
    for (term l = specs; l->kind == K_CONS; l = tl(l)) {
        term c = child_check(hd(l));
        if (is_tagged(c, am_error, 2)) return tuple(2, am_stop, tuple(2, am_start_spec, elem(c, 1)));
        if (child_by(checked.head, am_id, child_get(c, am_id))) /* the list so far */
            return tuple(2, am_stop, tuple(2, am_start_spec, tuple(2, am_duplicate_child_name, child_get(c, am_id))));
        list_builder_add(&checked, c);
    }
    term children = list_builder_done(&checked, NIL);
    term reason = NULL, started;
    term failed = children_start(children, &started, &reason);
    if (failed) {
        children_shutdown(started);
        return tuple(2, am_stop, tuple(2, am_shutdown, tuple(3, am_failed_to_start_child, failed, reason)));
    }
    term st = map(6, am_module, module, am_strategy, strategy, am_intensity, intensity, am_period, period,
                     am_restarts, NIL, am_children, started);
    return tuple(2, am_ok, st);
}

static term reply(term value, term st) { return tuple(3, am_reply, value, st); }

/* Supervisor.start_child: {:ok, pid}, or OTP's errors. */
static term sup_start_child(term spec, term st) {
    term c = child_check(spec);
    if (is_tagged(c, am_error, 2)) return reply(c, st);
    term children = sup_get(st, am_children);
    term old = child_by(children, am_id, child_get(c, am_id));
    if (old && is_pid(child_get(old, am_pid)))
        return reply(tuple(2, am_error, tuple(2, am_already_started, child_get(old, am_pid))), st);
    if (old) return reply(tuple(2, am_error, am_already_present), st);
    term r = child_start(c);
    if (is_tagged(r, am_error, 2))
        return reply(tuple(2, am_error, tuple(2, elem(r, 1), child_record(c))), st);
    if (elem(r, 1) != am_undefined || child_get(c, am_restart) != am_temporary)
        st = map_put(st, am_children, list_append(children, map_put(c, am_pid, elem(r, 1))));
    return reply(r, st);
}

static term sup_handle_call(term req, term from, term st) {
    (void)from;
    term children = sup_get(st, am_children);
    if (req == am_which_children) { /* newest first, as OTP lists them */
        term result = NIL;
        for (term l = children; l->kind == K_CONS; l = tl(l)) {
            term c = hd(l);
            result = cons(tuple(4, child_get(c, am_id), child_get(c, am_pid), child_get(c, am_type),
                                    child_get(c, am_modules)), result);
        }
        return reply(result, st);
    }
    if (req == am_count_children) {
        int64_t active = 0, specs = 0, sups = 0, workers = 0;
        for (term l = children; l->kind == K_CONS; l = tl(l)) {
            specs++;
            active += is_pid(child_get(hd(l), am_pid));
            if (child_get(hd(l), am_type) == am_supervisor) sups++; else workers++;
        }
        return reply(map(4, am_active, integer(active), am_specs, integer(specs), am_supervisors,
                             integer(sups), am_workers, integer(workers)), st);
    }
    if (is_tagged(req, am_start_child, 2)) return sup_start_child(elem(req, 1), st);
    /* The rest name a child by id; any other request matches no clause of
     * :supervisor.handle_call/3, and the supervisor crashes, as OTP's does. */
    bool by_id = is_tagged(req, am_terminate_child, 2) || is_tagged(req, am_restart_child, 2) ||
                 is_tagged(req, am_delete_child, 2) || is_tagged(req, am_get_childspec, 2);
    if (!by_id) raise_error(function_clause_error(am_supervisor, am_handle_call, 3));
    term id = elem(req, 1), c = child_by(children, am_id, id);
    if (!c) return reply(tuple(2, am_error, am_not_found), st);
    if (is_tagged(req, am_get_childspec, 2))
        return reply(tuple(2, am_ok, map_put(map_delete(c, am_pid), atom("significant"), am_false)), st);
    if (is_tagged(req, am_terminate_child, 2)) {
        child_shutdown(c);
        term rest = child_get(c, am_restart) == am_temporary ? NULL : map_put(c, am_pid, am_undefined);
        return reply(am_ok, map_put(st, am_children, children_replace(children, id, rest)));
    }
    if (is_tagged(req, am_restart_child, 2)) {
        term pid = child_get(c, am_pid);
        if (is_pid(pid)) return reply(tuple(2, am_error, am_running), st);
        if (pid == am_restarting) return reply(tuple(2, am_error, am_restarting), st);
        term r = child_start(c);
        if (is_ok_tuple(r))
            st = map_put(st, am_children, children_replace(children, id, map_put(c, am_pid, elem(r, 1))));
        return reply(r, st);
    }
    /* {:delete_child, id} */
    term pid = child_get(c, am_pid);
    if (is_pid(pid)) return reply(tuple(2, am_error, am_running), st);
    if (pid == am_restarting) return reply(tuple(2, am_error, am_restarting), st);
    return reply(am_ok, map_put(st, am_children, children_replace(children, id, NULL)));
}

static term sup_handle_cast(term req, term st) {
    /* {:try_again_restart, id}: a restart that failed, tried again.  OTP's
     * supervisor has no other handle_cast clause: anything else is a
     * FunctionClauseError, and the supervisor crashes. */
    if (!is_tagged(req, am_try_again_restart, 2))
        raise_error(function_clause_error(am_supervisor, am_handle_cast, 2));
    term c = child_by(sup_get(st, am_children), am_id, elem(req, 1));
    if (c && child_get(c, am_pid) == am_restarting && !sup_restart(&st, c))
        return tuple(3, am_stop, am_shutdown, st);
    return tuple(2, am_noreply, st);
}

static term sup_handle_info(term msg, term st) {
    if (!is_tagged(msg, am_EXIT, 3)) {
        struct buf b = {0};
        buf_puts(&b, "Supervisor received unexpected message: ");
        inspect_to(&b, msg);
        buf_puts(&b, "\n"); /* OTP's format ends with ~n */
        logger_log(LOG_ERROR, buf_str(&b));
        buf_free(&b);
        return tuple(2, am_noreply, st);
    }
    term child = child_by(sup_get(st, am_children), am_pid, elem(msg, 1));
    if (!child) return tuple(2, am_noreply, st); /* not one of ours (any more) */
    /* Too many restarts too quickly: shut every child down and exit with
     * :shutdown (terminate/2 below does the shutting down). */
    if (!sup_child_exited(&st, child, elem(msg, 2))) return tuple(3, am_stop, am_shutdown, st);
    return tuple(2, am_noreply, st);
}

static void sup_terminate(term reason, term st) {
    (void)reason;
    if (is_map(st)) children_shutdown(sup_get(st, am_children));
}

/* Supervisor.init/2: {:ok, {flags, child specs}} for a supervisor's init/1.
 * opts: strategy: (required), max_restarts: (3), max_seconds: (5). */
API term supervisor_init(term children, term opts) {
    term strategy = keyword_get(opts, am_strategy, NULL);
    if (!strategy) raise_error(argument_error("expected :strategy option to be given"));
    term flags = map(3, am_strategy, strategy, am_intensity, keyword_get(opts, am_max_restarts, integer(3)),
                        am_period, keyword_get(opts, am_max_seconds, integer(5)));
    struct list_builder specs;
    list_builder_init(&specs);
    for (term l = children; l->kind == K_CONS; l = tl(l))
        list_builder_add(&specs, is_erlang_child_spec(hd(l)) ? hd(l) : supervisor_child_spec(hd(l), NIL));
    return tuple(2, am_ok, tuple(2, flags, list_builder_done(&specs, NIL)));
}

/* Supervisor.start_link/3 — a supervisor whose module's init/1 gives its
 * children: KV.Supervisor.start_link(opts) calls this. */
API term supervisor_start_link(term module, term arg, term opts) {
    return gen_start(am_supervisor, tuple(2, module, arg), opts, true);
}

/* Supervisor.start_link/2 with a list of children: its module is
 * Supervisor.Default, whose init/1 returns what Supervisor.init/2 made.
 * (Its entry in the code server's table, and OTP's supervisor's, are in
 * Part IX.) */
static term default_init(term spec) { return spec; }

/* Supervisor.start_link/2 — children and options: [strategy: ...] */
API term supervisor_start_link_children(term children, term opts) {
    term sup_opts, start_opts, keys[] = {am_strategy, am_max_restarts, am_max_seconds, NULL};
    keyword_split(opts, keys, &sup_opts, &start_opts);
    term spec = supervisor_init(children, sup_opts);
    return gen_start(am_supervisor, tuple(2, alias("Supervisor.Default"), spec), start_opts, true);
}

/* Supervisor.which_children/1 — [{id, pid, type, modules}], newest first */
API term supervisor_which_children(term sup) {
    return gen_server_call_timeout(sup, am_which_children, am_infinity);
}

/* Supervisor.count_children/1 — %{active:, specs:, supervisors:, workers:} */
API term supervisor_count_children(term sup) {
    return gen_server_call_timeout(sup, am_count_children, am_infinity);
}

/* Supervisor.start_child/2 — the child is a module, {module, arg} or a map */
API term supervisor_start_child(term sup, term child) {
    term spec = is_erlang_child_spec(child) ? child : supervisor_child_spec(child, NIL);
    return gen_server_call_timeout(sup, tuple(2, am_start_child, spec), am_infinity);
}

/* :supervisor.get_childspec/2 — {:ok, the child's spec with every default
 * filled in}, or {:error, :not_found}; by id only, as OTP. */
API term supervisor_get_childspec(term sup, term id) {
    return gen_server_call_timeout(sup, tuple(2, atom("get_childspec"), id), am_infinity);
}

/* Supervisor.terminate_child/2 — by id: :ok or {:error, :not_found} */
API term supervisor_terminate_child(term sup, term id) {
    return gen_server_call_timeout(sup, tuple(2, am_terminate_child, id), am_infinity);
}

/* Supervisor.restart_child/2 — start a stopped child again */
API term supervisor_restart_child(term sup, term id) {
    return gen_server_call_timeout(sup, tuple(2, am_restart_child, id), am_infinity);
}

/* Supervisor.delete_child/2 — forget a stopped child's spec */
API term supervisor_delete_child(term sup, term id) {
    return gen_server_call_timeout(sup, tuple(2, am_delete_child, id), am_infinity);
}

/* Supervisor.stop/3 */
API term supervisor_stop(term sup, term reason, term timeout) { return gen_server_stop(sup, reason, timeout); }

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "Our first supervisor": KV.Supervisor
 * --------------------------------------------------------------------------
 * KV.Supervisor `use`s Supervisor: its init/1 lists the children and the
 * strategy.  The guide writes init/1 more than once, and each form stands
 * under the section that writes it.
 */

/* KV.Supervisor.start_link/1 — Supervisor.start_link(__MODULE__, :ok, opts) */
API term kv_supervisor_start_link(term opts) { return supervisor_start_link(alias("KV.Supervisor"), am_ok, opts); }

/* retired at supervisor-and-application/naming: the registry gets a name
// KV.Supervisor.init/1, the first form: one child, KV.Registry, without a
// name, under :one_for_one
static term kv_supervisor_init(term arg) {
    (void)arg;
    return supervisor_init(list(1, alias("KV.Registry")), list(1, tuple(2, am_strategy, am_one_for_one)));
}
*/

/* KV.Supervisor.child_spec/1 (use Supervisor) */
static term kv_supervisor_child_spec(term arg) { return use_child_spec(alias("KV.Supervisor"), arg, am_nil, am_supervisor); }

//> supervisor-and-application/naming
/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "Naming processes"
 * --------------------------------------------------------------------------
 * A pid is only known to whoever started the process, and a restarted
 * child gets a new one.  So KV.Supervisor's init lists the registry as
 * {KV.Registry, name: KV.Registry}: its child spec's start becomes
 * KV.Registry.start_link([name: KV.Registry]), which passes the option on
 * to GenServer.start_link, which registers the new process under that
 * atom (process_register, III.7) before init runs.  Every process can then
 * write KV.Registry where it needed the pid, and after a restart the name
 * points at the new registry.
 */

/* retired at dynamic-supervisor/bucket-supervisor: the bucket supervisor joins the tree
// KV.Supervisor.init/1: children [{KV.Registry, name: KV.Registry}], :one_for_one
static term kv_supervisor_init(term arg) {
    (void)arg;
    term registry = tuple(2, alias("KV.Registry"), list(1, tuple(2, am_name, alias("KV.Registry"))));
    return supervisor_init(list(1, registry), list(1, tuple(2, am_strategy, am_one_for_one)));
}
*/

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "Understanding applications"
 * --------------------------------------------------------------------------
 * Mix writes _build/dev/lib/kv/ebin/kv.app, an Erlang term, with io_lib's
 * pretty printer (~p): the application's name, description, version,
 * modules, the applications it depends on, and, once the guide adds the
 * application callback, `mod`.  kv.c keeps the same facts in C and prints
 * the term the same way.  As Mix does, it lists the modules that were
 * compiled, here the ones loaded whose names start with KV, and it writes
 * `mod` only once the callback module defines start/2: the file grows
 * with the guide, chapter by chapter, as Mix's does.
 */

struct app_spec {
    const char *name, *description, *vsn;
    const char *applications[5]; /* what must be started first */
    const char *prefix;          /* its modules: this one and those under it */
    const char *mod;             /* the application callback module, once it has start/2 */
};

static const struct app_spec app_specs[] = {
    {"kernel", "ERTS  CXC 138 10", "8.5.3", {NULL}, NULL, NULL},
    {"stdlib", "ERTS  CXC 138 10", "4.2", {"kernel", NULL}, NULL, NULL},
    {"elixir", "elixir", "1.14.0", {"kernel", "stdlib", NULL}, NULL, NULL},
    {"logger", "logger", "1.14.0", {"kernel", "stdlib", "elixir", NULL}, NULL, NULL},
    {"kv", "kv", "0.1.0", {"kernel", "stdlib", "elixir", "logger", NULL}, "KV", "KV"},
    {NULL, NULL, NULL, {NULL}, NULL, NULL},
};

/* The application's callback module, if it is loaded and defines start/2. */
static const struct module *app_callback(const struct app_spec *a) {
    const struct module *m = a->mod ? code_find(alias(a->mod)) : NULL;
    return m && m->start ? m : NULL;
}

/* The loaded modules that belong to the application, sorted as Mix lists
 * them: KV, KV.Bucket, KV.Registry, ... */
static term app_modules(const struct app_spec *a) {
    term mods = empty_map(); /* a map's keys are kept sorted: used as a set */
    size_t n = a->prefix ? strlen(a->prefix) : 0;
    for (size_t i = 0; n && i < code.n; i++) {
        const char *name = code.mods[i]->name;
        if (strncmp(name, a->prefix, n) == 0 && (name[n] == '\0' || name[n] == '.'))
            mods = map_put(mods, alias(name), am_true);
    }
    struct list_builder l;
    list_builder_init(&l);
    struct map_iter it;
    term mod, unused;
    for (map_iter_start(&it, mods); map_iter_next(&it, &mod, &unused);) list_builder_add(&l, mod);
    return list_builder_done(&l, NIL);
}

static const struct app_spec *app_spec_of(term app) {
    for (const struct app_spec *a = app_specs; a->name; a++)
        if (is_atom(app) && strcmp(a->name, BYTES(app)) == 0) return a;
    return NULL;
}

/* 'kv' — an Erlang string, a list of character codes. */
static term charlist(const char *s) {
    term l = NIL;
    for (size_t i = strlen(s); i-- > 0;) l = cons(integer((unsigned char)s[i]), l);
    return l;
}

static term atom_list(const char *const *names) {
    term l = NIL;
    size_t n = 0;
    while (names[n]) n++;
    while (n--) l = cons(atom(names[n]), l);
    return l;
}

/* :file.consult("kv.app") — the term Mix writes there, {:application, :kv, [...]} */
API term application_resource(term app) {
    const struct app_spec *a = app_spec_of(app);
    if (!a) return am_nil;
    term keys = list(5, tuple(2, atom("applications"), atom_list(a->applications)),
                     tuple(2, atom("description"), charlist(a->description)),
                     tuple(2, am_modules, app_modules(a)),
                     tuple(2, atom("registered"), NIL), tuple(2, atom("vsn"), charlist(a->vsn)));
    if (app_callback(a))
        keys = list_append(keys, tuple(2, atom("mod"), tuple(2, alias(a->mod), NIL)));
    return tuple(3, atom("application"), app, keys);
}

/* ---- Erlang's ~p, for the .app file --------------------------------------
 * io_lib_pretty prints a term on one line when it fits in 80 columns.
 * Otherwise a tuple that starts with an atom keeps "{tag," on the line and
 * puts the other elements one under the other, in the column after it; a
 * list puts its elements one per line in the column after "[", or, when
 * each of them fits on a line, fills lines with as many as fit.  That is
 * the subset of its rules the .app term needs. */

static bool erl_atom_plain(term a) {
    const char *s = BYTES(a);
    if (a->n == 0 || !(s[0] >= 'a' && s[0] <= 'z')) return false;
    for (size_t i = 1; i < a->n; i++)
        if (!is_ident_char((unsigned char)s[i])) return false;
    return true;
}

static void erl_flat(struct buf *b, term t) {
    switch ((enum kind)t->kind) {
    case K_ATOM:
        if (erl_atom_plain(t)) buf_add(b, BYTES(t), t->n);
        else { buf_puts(b, "'"); escape_into(b, BYTES(t), t->n, '\''); buf_puts(b, "'"); }
        return;
    case K_TUPLE:
        buf_puts(b, "{");
        for (size_t i = 0; i < t->n; i++) { if (i) buf_puts(b, ","); erl_flat(b, elem(t, i)); }
        buf_puts(b, "}");
        return;
    case K_NIL:
        buf_puts(b, "[]");
        return;
    case K_CONS:
        if (charlist_printable(t)) {
            buf_puts(b, "\"");
            for (term l = t; l->kind == K_CONS; l = tl(l)) {
                char c = (char)int_value(hd(l));
                escape_into(b, &c, 1, '"');
            }
            buf_puts(b, "\"");
            return;
        }
        buf_puts(b, "[");
        for (term l = t; l->kind == K_CONS; l = tl(l)) {
            erl_flat(b, hd(l));
            if (tl(l)->kind == K_CONS) buf_puts(b, ",");
            else if (tl(l)->kind != K_NIL) { buf_puts(b, "|"); erl_flat(b, tl(l)); }
        }
        buf_puts(b, "]");
        return;
    default:
        inspect_to(b, t);
        return;
    }
}

static size_t erl_width(term t) {
    struct buf b = {0};
    erl_flat(&b, t);
    size_t n = b.len;
    buf_free(&b);
    return n;
}

static void erl_indent(struct buf *b, size_t col) {
    buf_puts(b, "\n");
    for (size_t i = 0; i < col; i++) buf_puts(b, " ");
}

/* Print t at column `col`; `tail` characters (closing brackets, a comma)
 * will follow it on its last line. */
static void erl_pretty(struct buf *b, term t, size_t col, size_t tail) {
    if (col + erl_width(t) + tail <= 80 || (t->kind != K_TUPLE && t->kind != K_CONS) ||
        (t->kind == K_CONS && charlist_printable(t))) {
        erl_flat(b, t);
        return;
    }
    if (t->kind == K_TUPLE && t->n >= 2 && is_atom(elem(t, 0))) {
        buf_puts(b, "{");
        erl_flat(b, elem(t, 0));
        buf_puts(b, ",");
        size_t at = col + 1 + erl_width(elem(t, 0)) + 1;
        for (size_t i = 1; i < t->n; i++) {
            if (i > 1) erl_indent(b, at);
            erl_pretty(b, elem(t, i), at, i + 1 < t->n ? 1 : tail + 1);
            if (i + 1 < t->n) buf_puts(b, ",");
        }
        buf_puts(b, "}");
        return;
    }
    bool is_tuple_ = t->kind == K_TUPLE;
    size_t n = is_tuple_ ? t->n : list_length(t), at = col + 1;
    term items = is_tuple_ ? NIL : t;
    bool fill = true;
    for (size_t i = 0; i < n; i++) {
        term e = is_tuple_ ? elem(t, i) : hd(items);
        if (!is_tuple_) items = tl(items);
        fill = fill && at + erl_width(e) + 1 <= 80;
    }
    buf_puts(b, is_tuple_ ? "{" : "[");
    size_t pos = at;
    items = is_tuple_ ? NIL : t;
    for (size_t i = 0; i < n; i++) {
        term e = is_tuple_ ? elem(t, i) : hd(items);
        if (!is_tuple_) items = tl(items);
        size_t after = i + 1 < n ? 1 : tail + 1;
        if (i > 0) {
            if (!fill || pos + erl_width(e) + after > 80) { erl_indent(b, at); pos = at; }
        }
        size_t before = b->len;
        erl_pretty(b, e, pos, after);
        pos += b->len - before;
        if (i + 1 < n) { buf_puts(b, ","); pos++; }
    }
    buf_puts(b, is_tuple_ ? "}" : "]");
}

/* The text of kv.app: the term as io_lib:format("~p.~n") writes it. */
API void application_resource_file(struct buf *b, term app) {
    erl_pretty(b, application_resource(app), 0, 1);
    buf_puts(b, ".\n");
}

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "Starting applications"
 * --------------------------------------------------------------------------
 * OTP's application controller is a process that knows which applications
 * are running.  Starting one checks that the applications it depends on
 * run already, then, if it has a callback module, starts an application
 * master: a process that calls the callback's start/2, links to the
 * supervisor it returns, and reports to the controller when that
 * supervisor dies.  Stopping one shuts its supervision tree down.
 *
 * Elixir's :logger is an application too; while it is stopped, kv.c's
 * Logger prints nothing.
 */

static term app_start_mfa(const struct app_spec *a) {
    return tuple(3, alias(a->mod), am_start, list(2, am_normal, NIL));
}

struct app_run {
    const struct module *mod;
    term result;
};

static void app_call_start(void *arg) {
    struct app_run *r = arg;
    r->result = r->mod->start(am_normal, NIL);
}

/* The application master: start the callback, then watch the tree.
 * arg is {app, controller}. */
static void app_master(term arg) {
    const struct app_spec *a = app_spec_of(elem(arg, 0));
    const struct module *mod = app_callback(a);
    term controller = elem(arg, 1);
    process_flag_trap_exit(true);
    struct app_run r = {mod, NULL};
    term caught, result;
    enum caught kind = try_catch(app_call_start, &r, &caught);
    term mfa = app_start_mfa(a);
    if (kind == CAUGHT_ERROR) caught = tuple(2, caught, NIL);
    if (kind != CAUGHT_NOTHING)
        result = tuple(2, am_bad_return, tuple(2, mfa, tuple(2, am_EXIT, caught)));
    else if (is_started(r.result))
        result = am_ok;
    else if (is_tagged(r.result, am_error, 2))
        result = tuple(2, elem(r.result, 1), mfa);
    else
        result = tuple(2, am_bad_return, tuple(2, mfa, r.result));
    process_send(controller, tuple(3, am_app_started, self(), result));
    if (result != am_ok) return;
    term sup = elem(r.result, 1);
    term state = tuple_size(r.result) == 3 ? elem(r.result, 2) : am_nil;
    for (;;) {
        term m = receive_forever(NULL, NULL);
        if (is_tagged(m, am_EXIT, 3) && term_eq(elem(m, 1), sup)) { /* the tree died */
            if (mod->prep_stop) state = mod->prep_stop(state);
            if (mod->stop) mod->stop(state);
            process_send(controller, tuple(3, am_app_exited, elem(arg, 0), elem(m, 2)));
            return;
        }
        if (m == am_stop) { /* Application.stop: prep_stop, the tree, stop */
            if (mod->prep_stop) state = mod->prep_stop(state);
            term ref = process_monitor(sup);
            process_exit(sup, am_shutdown);
            receive_forever(match_down_of, ref);
            if (mod->stop) mod->stop(state);
            return;
        }
    }
}

/* The controller's state: %{started: [{app, master pid or nil}, ...]},
 * newest first. */
static term started_find(term st, term app) {
    for (term l = map_get(st, am_started, NIL); l->kind == K_CONS; l = tl(l))
        if (elem(hd(l), 0) == app) return hd(l);
    return NULL;
}

static term started_without(term started, term app) {
    struct list_builder r;
    list_builder_init(&r);
    for (; started->kind == K_CONS; started = tl(started))
        if (elem(hd(started), 0) != app) list_builder_add(&r, hd(started));
    return list_builder_done(&r, NIL);
}

static bool is_start_mfa(term t) {
    return is_tuple(t) && tuple_size(t) == 3 && elem(t, 1) == am_start;
}

/* [notice] Application kv exited: ... — the reason as Application.format_error/1 words it. */
static void log_app_exit(term app, term reason) {
    struct buf b = {0};
    buf_printf(&b, "Application %s exited: ", BYTES(app));
    term inner = is_tagged(reason, am_bad_return, 2) ? elem(reason, 1) : NULL;
    if (is_tuple(reason) && tuple_size(reason) == 2 && !inner && is_start_mfa(elem(reason, 1))) {
        mfa_call_text(&b, elem(reason, 1)); /* start/2 returned {:error, _} */
        buf_puts(&b, " returned an error: ");
        format_exit_to(&b, elem(reason, 0), "\n    ");
    } else if (inner && is_tagged(elem(inner, 1), am_EXIT, 2)) { /* it raised or exited */
        format_exit_to(&b, tuple(2, elem(elem(inner, 1), 1), elem(inner, 0)), "\n    ");
    } else if (inner) { /* it returned something else */
        mfa_call_text(&b, elem(inner, 0));
        buf_puts(&b, " returned a bad value: ");
        inspect_to(&b, elem(inner, 1));
    } else {
        format_exit_to(&b, reason, "\n    ");
    }
    logger_log(LOG_NOTICE, buf_str(&b));
    buf_free(&b);
}

static bool match_app_started(term msg, const void *pid) {
    return is_tagged(msg, am_app_started, 3) && term_eq(elem(msg, 1), (term)pid);
}

static term ctl_start(term app, term st) {
    const struct app_spec *a = app_spec_of(app);
    if (!a) {
        struct buf b = {0};
        buf_printf(&b, "%s.app", BYTES(app));
        term r = tuple(2, am_error, tuple(2, charlist("no such file or directory"), charlist(buf_str(&b))));
        buf_free(&b);
        return reply(r, st);
    }
    if (started_find(st, app)) return reply(tuple(2, am_error, tuple(2, am_already_started, app)), st);
    for (size_t i = 0; a->applications[i]; i++)
        if (!started_find(st, atom(a->applications[i])))
            return reply(tuple(2, am_error, tuple(2, am_not_started, atom(a->applications[i]))), st);
    term master = am_nil;
    if (app_callback(a)) {
        master = spawn_link(app_master, tuple(2, app, self()));
        term m = receive_forever(match_app_started, master);
        term result = elem(m, 2);
        if (result != am_ok) {
            log_app_exit(app, result);
            return reply(tuple(2, am_error, result), st);
        }
    }
    if (app == am_logger) logger_started = true;
    term started = cons(tuple(2, app, master), map_get(st, am_started, NIL));
    return reply(am_ok, map_put(st, am_started, started));
}

static term ctl_stop(term app, term st) {
    term entry = started_find(st, app);
    if (!entry) return reply(tuple(2, am_error, tuple(2, am_not_started, app)), st);
    term master = elem(entry, 1);
    if (is_pid(master)) {
        term ref = process_monitor(master);
        process_send(master, am_stop);
        receive_forever(match_down_of, ref);
    }
    st = map_put(st, am_started, started_without(map_get(st, am_started, NIL), app));
    if (app == am_logger) logger_started = false; /* so it cannot say so */
    log_app_exit(app, atom("stopped"));
    return reply(am_ok, st);
}

static term ctl_init(term arg) {
    process_flag_trap_exit(true);
    term started = NIL;
    for (term l = arg; l->kind == K_CONS; l = tl(l)) started = cons(tuple(2, hd(l), am_nil), started);
    logger_started = true;
    return tuple(2, am_ok, map(1, am_started, started));
}

static term ctl_handle_call(term req, term from, term st) {
    (void)from;
    if (is_tagged(req, am_start, 2)) return ctl_start(elem(req, 1), st);
    if (is_tagged(req, am_stop, 2)) return ctl_stop(elem(req, 1), st);
    /* :started_applications */
    term result = NIL, l = map_get(st, am_started, NIL);
    for (; l->kind == K_CONS; l = tl(l)) {
        const struct app_spec *a = app_spec_of(elem(hd(l), 0));
        result = list_append(result, tuple(3, elem(hd(l), 0), charlist(a->description), charlist(a->vsn)));
    }
    return reply(result, st);
}

static term ctl_handle_info(term msg, term st) {
    if (is_tagged(msg, am_app_exited, 3)) { /* an application's tree died */
        term app = elem(msg, 1);
        st = map_put(st, am_started, started_without(map_get(st, am_started, NIL), app));
        log_app_exit(app, elem(msg, 2));
    }
    return tuple(2, am_noreply, st);
}

/* Boot what `iex -S mix` boots: the application controller with kernel,
 * stdlib, elixir and logger running, then :kv itself unless `no_start`
 * (iex -S mix run --no-start). */
API term application_boot(bool no_start) {
    term base = list(4, atom("kernel"), atom("stdlib"), atom("elixir"), am_logger);
    term r = gen_server_start(am_application_controller, base, list(1, tuple(2, am_name, am_application_controller)));
    if (!is_tagged(r, am_ok, 2) || no_start) return r;
    term started = gen_server_call_timeout(am_application_controller, tuple(2, am_start, am_kv), am_infinity);
    return started == am_ok ? r : started;
}

/* Application.start/1 — :ok, {:error, {:already_started, app}},
 * {:error, {:not_started, dependency}}, ... */
API term application_start(term app) {
    if (!is_atom(app)) raise_error(function_clause_error(alias("Application"), am_start, 2));
    return gen_server_call_timeout(am_application_controller, tuple(2, am_start, app), am_infinity);
}

/* Application.stop/1 */
API term application_stop(term app) {
    if (!is_atom(app)) raise_error(function_clause_error(alias("Application"), am_stop, 1));
    return gen_server_call_timeout(am_application_controller, tuple(2, am_stop, app), am_infinity);
}

/* Application.spec/1 — what the application's .app file says, as a
 * keyword list, or nil for an application nobody knows.  (Elixir's answer
 * also has the keys the controller fills in when it loads one, id:,
 * maxP:, ...; kv.c loads nothing, so it has only the file's.) */
API term application_spec(term app) {
    if (!is_atom(app)) raise_error(function_clause_error(alias("Application"), atom("spec"), 1));
    term resource = application_resource(app);
    return resource == am_nil ? am_nil : elem(resource, 2);
}

/* Application.started_applications/0 — [{app, description, vsn}], newest first */
API term application_started_applications(void) {
    return gen_server_call_timeout(am_application_controller, atom("started_applications"), am_infinity);
}

/* Start app's dependencies, then app.  An unknown app (a == NULL) has no
 * dependencies to walk: application_start then answers for it. */
static term ensure_started(term app, term started) {
    const struct app_spec *a = app_spec_of(app);
    for (size_t i = 0; a && a->applications[i]; i++) {
        started = ensure_started(atom(a->applications[i]), started);
        if (is_tagged(started, am_error, 2)) return started;
    }
    term r = application_start(app);
    if (r == am_ok) return list_append(started, app);
    if (is_tagged(r, am_error, 2) && is_tagged(elem(r, 1), am_already_started, 2)) return started;
    return tuple(2, am_error, tuple(2, app, elem(r, 1)));
}

/* Application.ensure_all_started/1 — starts what app needs, then app:
 * {:ok, [the applications it started, in order]} */
API term application_ensure_all_started(term app) {
    if (!is_atom(app))
        raise_error(function_clause_error(alias("Application"), atom("ensure_all_started"), 2));
    term r = ensure_started(app, NIL);
    return is_tagged(r, am_error, 2) ? r : tuple(2, am_ok, r);
}

//> supervisor-and-application/callback
/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "The application callback": KV
 * --------------------------------------------------------------------------
 * `use Application` and start/2 make KV the application callback module;
 * mix.exs's mod: {KV, []} names it, and kv.app now says so (app_callback,
 * above).  Starting :kv calls KV.start(:normal, []), which starts the
 * tree.  KV.hello, and its test, go: the guide says to remove them. */

/* KV.start/2 — KV.Supervisor.start_link(name: KV.Supervisor) */
static term kv_start(term type, term args) {
    (void)type, (void)args;
    return kv_supervisor_start_link(list(1, tuple(2, am_name, alias("KV.Supervisor"))));
}

/* --------------------------------------------------------------------------
 * supervisor-and-application.md — "Projects or applications?"
 * --------------------------------------------------------------------------
 * Mix, the project side, has no twin here: the project is this file and
 * its Makefile.  The application, what OTP starts and stops as a whole, is
 * :kv: its spec in app_specs and its callback module, KV, above.
 */

//> dynamic-supervisor
/* ==========================================================================
 * PART VIII — dynamic-supervisor.md: "Supervising dynamic children"
 * ==========================================================================
 *
 * The chapter opens with a failing test, "removes bucket on crash" (in
 * kv_test.c): a bucket that stops with :shutdown takes the registry down
 * with it, because the registry started the bucket with start_link and so
 * is linked to it.  (chapters/3-supervisor-and-application shows the test
 * failing.)  The cure is to start buckets under a supervisor of their
 * own, which restarts nothing it should not and only the registry
 * monitors.
 */

//> dynamic-supervisor/bucket-supervisor
/* --------------------------------------------------------------------------
 * dynamic-supervisor.md — OTP's side of "The bucket supervisor": DynamicSupervisor
 * --------------------------------------------------------------------------
 * A Supervisor knows its children before it starts (its init/1 lists
 * them) and names each by an id.  A DynamicSupervisor starts with none and
 * is handed them one at a time, with start_child; there may be thousands,
 * all alike (a bucket per name), so it knows them only by pid.  Elixir's
 * DynamicSupervisor (a GenServer, like :supervisor) keeps:
 *
 *     %{strategy: :one_for_one, intensity: 3, period: 5, restarts: [...],
 *       max_children: :infinity, extra_arguments: [],
 *       children: %{pid => {start, restart, shutdown, type, modules}}}
 *
 * and differs from Supervisor in four ways the guide's bucket supervisor
 * relies on:
 *
 *   - one strategy only, :one_for_one: children are independent;
 *   - start_child(sup, spec) checks the spec, prepends extra_arguments to
 *     its start arguments, refuses past max_children, and answers
 *     {:ok, pid}; the id is ignored (two children may share one);
 *   - a crashed child is restarted (or not, by its restart type) under a
 *     new pid; a restart that fails is retried, the child kept meanwhile
 *     under its old pid as {:restarting, child};
 *   - shutdown tells every child at once, then waits for them all,
 *     killing those that outlive their shutdown time: with many buckets,
 *     stopping them one by one, as Supervisor does, would take their sum
 *     (Elixir 1.14's DynamicSupervisor does this too).
 *
 * Restart intensity is counted exactly as Supervisor counts it
 * (add_restart, Part VII).
 */

/* Part VIII's atoms (I.3 says how atoms are declared). */
#define DYNAMIC_SUPERVISOR_ATOMS(X) X(max_children, "max_children") \
    X(extra_arguments, "extra_arguments")
DECLARE_ATOMS(DYNAMIC_SUPERVISOR_ATOMS)

/* The child as DynamicSupervisor keeps it: {mfa, restart, shutdown, type, modules}. */
static term dyn_child_of(term spec) {
    term c = child_check(spec);
    if (is_tagged(c, am_error, 2)) return c;
    return tuple(5, child_get(c, am_start), child_get(c, am_restart), child_get(c, am_shutdown),
                    child_get(c, am_type), child_get(c, am_modules));
}

/* DynamicSupervisor.init/1 — the flags: strategy (only :one_for_one),
 * max_restarts (3), max_seconds (5), max_children, extra_arguments. */
API term dynamic_supervisor_init(term opts) {
    return tuple(2, am_ok, map(5, am_strategy, keyword_get(opts, am_strategy, am_one_for_one),
                                    am_intensity, keyword_get(opts, am_max_restarts, integer(3)),
                                    am_period, keyword_get(opts, am_max_seconds, integer(5)),
                                    am_max_children, keyword_get(opts, am_max_children, am_infinity),
                                    am_extra_arguments, keyword_get(opts, am_extra_arguments, NIL)));
}

/* DynamicSupervisor.init/1 checks nothing; its process's init does, in
 * this order, each failure a {:supervisor_data, {what, value}}. */
static term dyn_flags_check(term flags) {
    term strategy = sup_get(flags, am_strategy), intensity = sup_get(flags, am_intensity);
    term period = sup_get(flags, am_period), max = sup_get(flags, am_max_children);
    term extra = sup_get(flags, am_extra_arguments);
    if (strategy != am_one_for_one) return tuple(2, am_invalid_strategy, strategy);
    if (!is_integer(intensity) || int_value(intensity) < 0) return tuple(2, atom("invalid_intensity"), intensity);
    if (!is_integer(period) || int_value(period) < 1) return tuple(2, atom("invalid_period"), period);
    if (max != am_infinity && !(is_integer(max) && int_value(max) >= 0))
        return tuple(2, atom("invalid_max_children"), max);
    if (!is_list(extra)) return tuple(2, atom("invalid_extra_arguments"), extra);
    return NULL;
}

/* The DynamicSupervisor's init: arg is {module, init_arg}, and
 * module.init(init_arg) gives the flags. */
static term dyn_init(term arg) {
    process_flag_trap_exit(true);
    term module = elem(arg, 0);
    const struct module *code;
    term r = behaviour_init(module, elem(arg, 1), &code);
    if (r == am_ignore) return am_ignore;
    if (!is_tagged(r, am_ok, 2) || !is_map(elem(r, 1)))
        return tuple(2, am_stop, tuple(2, am_bad_return, tuple(3, module, am_init, r)));
    term flags = elem(r, 1), bad = dyn_flags_check(flags);
    if (bad) return tuple(2, am_stop, tuple(2, am_supervisor_data, bad));
    return tuple(2, am_ok, map_put(map_put(flags, am_restarts, NIL), am_children, empty_map()));
}

/* Start one child: OTP's apply, with extra_arguments in front. */
static term dyn_start(term child, term st) {
    term mfa = elem(child, 0), extra = sup_get(st, am_extra_arguments);
    /* extra_arguments was checked to be a list, not a proper one: ++ on an
     * improper list crashes the DynamicSupervisor, as :erlang.++ does. */
    if (!is_proper_list(extra)) raise_error(argument_error("argument error"));
    term a = list_concat(extra, elem(mfa, 2));
    struct apply_run r = {tuple(3, elem(mfa, 0), elem(mfa, 1), a), NULL};
    term caught;
    switch (try_catch(apply_mfa, &r, &caught)) {
    case CAUGHT_NOTHING: break;
    case CAUGHT_ERROR: return tuple(2, am_error, tuple(2, caught, NIL));
    case CAUGHT_EXIT: return tuple(2, am_error, caught);
    case CAUGHT_THROW: return tuple(2, am_error, tuple(2, tuple(2, am_nocatch, caught), NIL));
    }
    term w = r.result;
    if (is_started(w)) return w;
    if (w == am_ignore || is_tagged(w, am_error, 2)) return w;
    return tuple(2, am_error, w);
}

/* Stop every child at once: send each its exit signal first, then wait
 * for them all, killing any that outlives its shutdown time.  The table
 * of who is done lives in the supervisor's own heap (proc_scratch): it is
 * held across the waits, and the supervisor may be killed in one.  Its
 * entries are in the order their monitors were made, so a :DOWN finds its
 * entry by a binary search on the monitor's reference: shutting down n
 * children costs n log n, however many there are. */
struct shutting_down {
    term pid;
    uint64_t ref;
    int64_t deadline;
    bool done;
};

static struct shutting_down *shutting_down_find(struct shutting_down *c, size_t n, uint64_t ref) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c[mid].ref == ref) return &c[mid];
        if (c[mid].ref < ref) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

/* The earliest deadline of those not done yet. */
static int64_t shutting_down_next(const struct shutting_down *c, size_t n) {
    int64_t next = INT64_MAX;
    for (size_t i = 0; i < n; i++)
        if (!c[i].done && c[i].deadline < next) next = c[i].deadline;
    return next;
}

static void dyn_shutdown_all(term children) {
    struct shutting_down *c = proc_scratch(children->n * sizeof *c);
    size_t n = 0;
    struct map_iter it;
    term pid, child;
    for (map_iter_start(&it, children); map_iter_next(&it, &pid, &child);) {
        if (is_tagged(child, am_restarting, 2)) continue;
        term shutdown = elem(child, 2);
        c[n].pid = pid;
        c[n].ref = process_monitor(pid)->u.id;
        c[n].done = false;
        process_unlink(pid);
        process_exit(pid, shutdown == am_brutal_kill ? am_kill : am_shutdown);
        c[n].deadline = is_integer(shutdown) ? now_ms() + int_value(shutdown) : INT64_MAX;
        n++;
    }
    /* `next` is recomputed only when it passes: one that is early because
     * its child is done already costs one wake-up for nothing. */
    size_t left = n;
    int64_t next = shutting_down_next(c, n);
    while (left) {
        int64_t wait = next == INT64_MAX ? NO_TIMEOUT : next > now_ms() ? next - now_ms() : 0;
        term m = receive_full(NULL, NULL, wait, "its children to shut down", NULL);
        if (m) {
            struct shutting_down *e = is_tagged(m, am_DOWN, 5) && is_reference(elem(m, 1))
                                          ? shutting_down_find(c, n, elem(m, 1)->u.id) : NULL;
            if (e && !e->done) e->done = true, left--;
            continue;
        }
        for (size_t i = 0; i < n; i++)
            if (!c[i].done && c[i].deadline <= now_ms()) process_exit(c[i].pid, am_kill), c[i].deadline = INT64_MAX;
        next = shutting_down_next(c, n);
    }
}

/* Restart the child that ran as pid; false if the intensity is exceeded. */
static bool dyn_restart(term *state, term pid, term child) {
    term st = map_put(*state, am_children, map_delete(sup_get(*state, am_children), pid));
    *state = st;
    if (add_restart(state)) return false;
    st = *state;
    term children = sup_get(st, am_children), r = dyn_start(child, st);
    if (is_ok_tuple(r)) {
        *state = map_put(st, am_children, map_put(children, elem(r, 1), child));
    } else { /* could not start it: try again, keeping it under the old pid */
        gen_server_cast(self(), tuple(2, am_try_again_restart, pid));
        *state = map_put(st, am_children, map_put(children, pid, tuple(2, am_restarting, child)));
    }
    return true;
}

static term dyn_handle_call(term req, term from, term st) {
    (void)from;
    term children = sup_get(st, am_children);
    struct map_iter it;
    term pid, c;
    if (req == am_which_children) {
        struct list_builder result;
        list_builder_init(&result);
        for (map_iter_start(&it, children); map_iter_next(&it, &pid, &c);) {
            bool restarting = is_tagged(c, am_restarting, 2);
            if (restarting) c = elem(c, 1);
            list_builder_add(&result, tuple(4, am_undefined, restarting ? am_restarting : pid, elem(c, 3), elem(c, 4)));
        }
        return reply(list_builder_done(&result, NIL), st);
    }
    if (req == am_count_children) {
        int64_t active = 0, sups = 0, workers = 0;
        for (map_iter_start(&it, children); map_iter_next(&it, &pid, &c);) {
            if (is_tagged(c, am_restarting, 2)) c = elem(c, 1); else active++;
            if (elem(c, 3) == am_supervisor) sups++; else workers++;
        }
        return reply(map(4, am_active, integer(active), am_specs, integer((int64_t)children->n), am_supervisors,
                             integer(sups), am_workers, integer(workers)), st);
    }
    if (is_tagged(req, am_start_child, 2)) {
        term max = sup_get(st, am_max_children);
        if (is_integer(max) && (int64_t)children->n >= int_value(max))
            return reply(tuple(2, am_error, am_max_children), st);
        term child = elem(req, 1), r = dyn_start(child, st);
        if (is_ok_tuple(r))
            st = map_put(st, am_children, map_put(children, elem(r, 1), child));
        return reply(r, st);
    }
    if (is_tagged(req, am_terminate_child, 2)) {
        term pid = elem(req, 1), child = map_get(children, pid, NULL);
        if (!child) return reply(tuple(2, am_error, am_not_found), st);
        if (!is_tagged(child, am_restarting, 2)) /* a child being restarted has no process */
            child_shutdown(map(2, am_pid, pid, am_shutdown, elem(child, 2)));
        return reply(am_ok, map_put(st, am_children, map_delete(children, pid)));
    }
    raise_error(function_clause_error(alias("DynamicSupervisor"), am_handle_call, 3));
}

/* {:try_again_restart, pid}; DynamicSupervisor ignores any other cast. */
static term dyn_handle_cast(term req, term st) {
    if (!is_tagged(req, am_try_again_restart, 2)) return tuple(2, am_noreply, st);
    term pid = elem(req, 1), child = map_get(sup_get(st, am_children), pid, NULL);
    if (child && is_tagged(child, am_restarting, 2) && !dyn_restart(&st, pid, elem(child, 1)))
        return tuple(3, am_stop, am_shutdown, st);
    return tuple(2, am_noreply, st);
}

static term dyn_handle_info(term msg, term st) {
    if (!is_tagged(msg, am_EXIT, 3)) {
        struct buf b = {0};
        buf_puts(&b, "DynamicSupervisor received unexpected message: ");
        inspect_to(&b, msg);
        buf_puts(&b, "\n"); /* ~n, as in Elixir's source */
        logger_log(LOG_ERROR, buf_str(&b));
        buf_free(&b);
        return tuple(2, am_noreply, st);
    }
    term pid = elem(msg, 1), reason = elem(msg, 2);
    term children = sup_get(st, am_children), child = map_get(children, pid, NULL);
    if (!child) return tuple(2, am_noreply, st);
    term restart = elem(child, 1);
    if (restart == am_temporary || (restart == am_transient && is_normal_exit(reason)))
        return tuple(2, am_noreply, map_put(st, am_children, map_delete(children, pid)));
    if (!dyn_restart(&st, pid, child)) return tuple(3, am_stop, am_shutdown, st);
    return tuple(2, am_noreply, st);
}

static void dyn_terminate(term reason, term st) {
    (void)reason;
    if (is_map(st)) dyn_shutdown_all(sup_get(st, am_children));
}

/* DynamicSupervisor.child_spec/1 — for {DynamicSupervisor, opts} children:
 * its id is the name, and it is a supervisor. */
API term dynamic_supervisor_child_spec(term opts) {
    term id = keyword_get(opts, am_name, alias("DynamicSupervisor"));
    return map(3, am_id, id, am_start, tuple(3, alias("DynamicSupervisor"), am_start_link, list(1, opts)),
                  am_type, am_supervisor);
}

/* DynamicSupervisor.start_link/1 — options: name:, strategy:, max_restarts:,
 * max_seconds:, max_children:, extra_arguments: */
API term dynamic_supervisor_start_link(term opts) {
    term sup_opts, start_opts;
    term keys[] = {am_strategy, am_max_restarts, am_max_seconds, am_max_children, am_extra_arguments, NULL};
    keyword_split(opts, keys, &sup_opts, &start_opts);
    term flags = dynamic_supervisor_init(sup_opts);
    return gen_start(alias("DynamicSupervisor"), tuple(2, alias("Supervisor.Default"), flags), start_opts, true);
}

/* DynamicSupervisor.start_link/3 — a module whose init/1 returns the flags,
 * as DynamicSupervisor.init/1 makes them */
API term dynamic_supervisor_start_link_module(term module, term arg, term opts) {
    return gen_start(alias("DynamicSupervisor"), tuple(2, module, arg), opts, true);
}

/* DynamicSupervisor.start_child/2 — {:ok, pid}, :ignore or {:error, reason} */
API term dynamic_supervisor_start_child(term sup, term child_spec) {
    term spec = is_erlang_child_spec(child_spec) ? child_spec : supervisor_child_spec(child_spec, NIL);
    term child = dyn_child_of(spec);
    if (is_tagged(child, am_error, 2)) {
        term why = elem(child, 1);
        if (why == am_missing_id || why == am_missing_start)
            why = tuple(2, am_invalid_child_spec, child_spec);
        return tuple(2, am_error, why);
    }
    return gen_server_call_timeout(sup, tuple(2, am_start_child, child), am_infinity);
}

/* DynamicSupervisor.terminate_child/2 — by pid */
API term dynamic_supervisor_terminate_child(term sup, term pid) {
    return gen_server_call_timeout(sup, tuple(2, am_terminate_child, pid), am_infinity);
}

/* DynamicSupervisor.which_children/1 — [{:undefined, pid, type, modules}] */
API term dynamic_supervisor_which_children(term sup) {
    return gen_server_call_timeout(sup, am_which_children, am_infinity);
}

/* DynamicSupervisor.count_children/1 */
API term dynamic_supervisor_count_children(term sup) {
    return gen_server_call_timeout(sup, am_count_children, am_infinity);
}

/* --------------------------------------------------------------------------
 * dynamic-supervisor.md — "The bucket supervisor": KV.BucketSupervisor
 * --------------------------------------------------------------------------
 * The bucket supervisor needs no module of its own: it is a
 * DynamicSupervisor started with a name and a strategy, as a child of
 * KV.Supervisor.  Where it stands among the children, and the strategy,
 * are for "Supervision trees" to settle.
 */

/* {DynamicSupervisor, name: KV.BucketSupervisor, strategy: :one_for_one} */
static term kv_bucket_supervisor_spec(void) {
    return tuple(2, alias("DynamicSupervisor"),
                 list(2, tuple(2, am_name, alias("KV.BucketSupervisor")), tuple(2, am_strategy, am_one_for_one)));
}

/* retired at dynamic-supervisor/supervision-trees: the bucket supervisor goes first, and :one_for_all
// KV.Supervisor.init/1: the registry, then the bucket supervisor, :one_for_one,
// as this section of the guide first adds it
static term kv_supervisor_init(term arg) {
    (void)arg;
    term registry = tuple(2, alias("KV.Registry"), list(1, tuple(2, am_name, alias("KV.Registry"))));
    return supervisor_init(list(2, registry, kv_bucket_supervisor_spec()),
                           list(1, tuple(2, am_strategy, am_one_for_one)));
}
*/

/* The registry now starts each bucket under the bucket supervisor: linked
 * to it, and only monitored by the registry.  A bucket that crashes no
 * longer takes the registry down ("removes bucket on crash" passes). */
static term kv_registry_handle_cast(term request, term state) {
    if (!is_tagged(request, am_create, 2))
        raise_error(function_clause_error(alias("KV.Registry"), am_handle_cast, 2));
    term name = elem(request, 1), names = elem(state, 0), refs = elem(state, 1);
    if (map_has_key(names, name)) return tuple(2, am_noreply, state);
    term bucket = ok_value(dynamic_supervisor_start_child(alias("KV.BucketSupervisor"), alias("KV.Bucket")));
    term ref = process_monitor(bucket);
    refs = map_put(refs, ref, name);
    names = map_put(names, name, bucket);
    return tuple(2, am_noreply, tuple(2, names, refs));
}

//> dynamic-supervisor/temporary
/* Still, a crashed bucket would be restarted by the bucket supervisor,
 * under a new pid the registry never hears of: an empty bucket nobody can
 * reach, a leak (chapters/4-dynamic-supervisor's README shows it with
 * count_children).  Buckets are made temporary: never restarted. */

/* KV.Bucket.child_spec/1 — `use Agent, restart: :temporary` */
API term kv_bucket_child_spec(term arg) { return use_child_spec(alias("KV.Bucket"), arg, am_temporary, am_worker); }

//> dynamic-supervisor/supervision-trees
/* --------------------------------------------------------------------------
 * dynamic-supervisor.md — "Supervision trees"
 * --------------------------------------------------------------------------
 * KV.Supervisor's children, final form: the bucket supervisor first,
 * because the registry calls it; then the registry; and :one_for_all,
 * because buckets without the registry are orphans (nobody can find them)
 * and the registry without its buckets is wrong.  With :one_for_one, a
 * registry that crashes would be restarted empty while its old buckets
 * lived on: chapters/4-dynamic-supervisor's README shows that too.
 */

/* KV.Supervisor.init/1 — the tree, final form */
static term kv_supervisor_init(term arg) {
    (void)arg;
    term registry = tuple(2, alias("KV.Registry"), list(1, tuple(2, am_name, alias("KV.Registry"))));
    return supervisor_init(list(2, kv_bucket_supervisor_spec(), registry), list(1, tuple(2, am_strategy, am_one_for_all)));
}

/* --------------------------------------------------------------------------
 * dynamic-supervisor.md — "Shared state in tests"
 * --------------------------------------------------------------------------
 * The guide's tests share KV.BucketSupervisor; kv_test.c boots a fresh :kv
 * application for each test that needs one, so no test sees another's
 * buckets.
 */

//> dynamic-supervisor/observer
/* --------------------------------------------------------------------------
 * dynamic-supervisor.md — "Observer": ./kv shell, Observer in text
 * --------------------------------------------------------------------------
 * dynamic-supervisor.md ends by opening Observer, to look at the tree and
 * to kill a process in it and watch the supervisors bring it back.  Two
 * later chapters (docs-tests-and-with.md, task-and-gen-tcp.md) give the
 * application a text protocol, one command a line, which KVServer serves
 * over TCP:
 *
 *     CREATE shopping          OK
 *     PUT shopping milk 1      OK
 *     GET shopping milk        1, then OK      (an absent key: an empty line)
 *     DELETE shopping milk     OK
 *     a bucket nobody made     NOT FOUND
 *     anything else            UNKNOWN COMMAND
 *
 * `./kv shell` starts :kv and reads that protocol from a terminal or a
 * pipe (no TCP yet: task-and-gen-tcp.md's server can be added on the same
 * two functions, KVServer.Command.parse and run), and adds Observer's view
 * of the running tree, in text: TREE, KILL, INFO, APP START and APP STOP
 * (HELP lists them).  Answers go to standard output, the Logger's reports
 * to standard error.  Before reading each line the shell lets every other
 * process run until all of them wait, so what a line prints never depends
 * on timing: the same input gives the same output, restarts included.
 */

/* The shell's atoms (I.3 says how atoms are declared). */
#define SHELL_ATOMS(X) X(put, "put") X(delete, "delete") X(unknown_command, "unknown_command") \
    X(KVServer_Command, "Elixir.KVServer.Command")
DECLARE_ATOMS(SHELL_ATOMS)

/* ---- The protocol, from docs-tests-and-with.md, "Doctests": KVServer.Command.parse ---- */

/* Where Elixir's String.split/1 splits: Unicode's white space, except the
 * non-breaking spaces (U+00A0, U+2007, U+202F).  The length of the
 * separator at s (n bytes left), or 0.  Bytes that are not valid UTF-8
 * are no separator: they stay in the word, as in Elixir. */
static size_t split_space(const unsigned char *s, size_t n) {
    if (s[0] == ' ' || (s[0] >= '\t' && s[0] <= '\r')) return 1;
    if (n >= 2 && s[0] == 0xC2 && s[1] == 0x85) return 2;                              /* U+0085 */
    if (n < 3) return 0;
    if (s[0] == 0xE1 && s[1] == 0x9A && s[2] == 0x80) return 3;                         /* U+1680 */
    if (s[0] == 0xE2 && s[1] == 0x80 && ((s[2] >= 0x80 && s[2] <= 0x8A && s[2] != 0x87) /* U+2000.. */
                                         || s[2] == 0xA8 || s[2] == 0xA9))              /* U+2028/9 */
        return 3;
    if (s[0] == 0xE2 && s[1] == 0x81 && s[2] == 0x9F) return 3;                         /* U+205F */
    if (s[0] == 0xE3 && s[1] == 0x80 && s[2] == 0x80) return 3;                         /* U+3000 */
    return 0;
}

#define COMMAND_WORDS 4 /* the most any command has: PUT bucket key value */

/* String.split(line): up to max words of text (n bytes), as binaries in
 * words; returns how many there are, or max + 1 if there are more. */
static size_t split_words(const char *text, size_t n, term *words, size_t max) {
    const unsigned char *s = (const unsigned char *)text;
    size_t count = 0, i = 0;
    while (i < n) {
        size_t sp;
        while (i < n && (sp = split_space(s + i, n - i)) > 0) i += sp;
        if (i == n) break;
        size_t start = i;
        while (i < n && split_space(s + i, n - i) == 0) i++;
        if (count == max) return max + 1;
        words[count++] = binary(text + start, i - start);
    }
    return count;
}

static bool word_is(term w, const char *s) { return w->n == strlen(s) && memcmp(BYTES(w), s, w->n) == 0; }

/* KVServer.Command.parse/1 — {:ok, command} for a known command with the
 * right number of words, {:error, :unknown_command} for anything else:
 * parse("PUT shopping milk 1\r\n") is {:ok, {:put, "shopping", "milk", "1"}} */
API term kv_server_command_parse(term line) {
    if (!is_binary(line)) raise_error(function_clause_error(alias("String"), atom("split"), 1));
    term w[COMMAND_WORDS];
    size_t n = split_words(BYTES(line), line->n, w, COMMAND_WORDS);
    if (n == 2 && word_is(w[0], "CREATE")) return tuple(2, am_ok, tuple(2, am_create, w[1]));
    if (n == 3 && word_is(w[0], "GET")) return tuple(2, am_ok, tuple(3, am_get, w[1], w[2]));
    if (n == 4 && word_is(w[0], "PUT")) return tuple(2, am_ok, tuple(4, am_put, w[1], w[2], w[3]));
    if (n == 3 && word_is(w[0], "DELETE")) return tuple(2, am_ok, tuple(3, am_delete, w[1], w[2]));
    return tuple(2, am_error, am_unknown_command);
}

/* ---- ...and "Running commands": KVServer.Command.run ---- */

/* "#{value}" for what a bucket can hold: a binary as it is, nil as "". */
static void to_string_into(struct buf *b, term value) {
    if (is_binary(value)) buf_add(b, BYTES(value), value->n);
    else if (is_atom(value) && value != am_nil) atom_text(b, value, false);
    else if (value != am_nil) inspect_to(b, value);
}

/* KVServer.Command.run/1 — the command, run against the :kv application:
 * {:ok, text} to send back, or {:error, :not_found} for a bucket the
 * registry does not know.  CREATE is a cast: it answers OK at once. */
API term kv_server_command_run(term command) {
    term registry = alias("KV.Registry");
    if (is_tagged(command, am_create, 2)) {
        kv_registry_create(registry, elem(command, 1));
        return tuple(2, am_ok, string("OK\r\n"));
    }
    bool get = is_tagged(command, am_get, 3), put = is_tagged(command, am_put, 4);
    bool delete = is_tagged(command, am_delete, 3);
    if (!get && !put && !delete) raise_error(function_clause_error(am_KVServer_Command, atom("run"), 1));
    term found = kv_registry_lookup(registry, elem(command, 1));
    if (!is_tagged(found, am_ok, 2)) return tuple(2, am_error, am_not_found);
    term bucket = elem(found, 1), key = elem(command, 2);
    if (put) kv_bucket_put(bucket, key, elem(command, 3));
    if (delete) kv_bucket_delete(bucket, key);
    struct buf b = {0};
    if (get) {
        to_string_into(&b, kv_bucket_get(bucket, key));
        buf_puts(&b, "\r\n");
    }
    buf_puts(&b, "OK\r\n");
    term text = binary(buf_str(&b), b.len);
    buf_free(&b);
    return tuple(2, am_ok, text);
}

/* ---- Observer, in text: TREE, KILL, INFO ---- */

/* The registered process whose name is the text w (n bytes): KV.Registry
 * (an alias), or application_controller.  The names table is searched by
 * text, so that no atom is made from what was typed (atoms are never
 * freed: I.3). */
static struct proc *whereis_text(const char *w, size_t n) {
    for (size_t i = 0; i < vm.nnames; i++) {
        term name = vm.names[i].name;
        const char *s = BYTES(name);
        size_t len = name->n;
        if (is_alias(s, len)) s += 7, len -= 7;
        if (len == n && memcmp(s, w, n) == 0) return vm.names[i].proc;
    }
    return NULL;
}

/* "#PID<0.81.0>" or "<0.81.0>": the number 81, or 0. */
static uint64_t pid_text(const char *w, size_t n) {
    if (n > 4 && memcmp(w, "#PID", 4) == 0) w += 4, n -= 4;
    if (n < 7 || memcmp(w, "<0.", 3) != 0 || memcmp(w + n - 3, ".0>", 3) != 0) return 0;
    uint64_t id = 0;
    for (size_t i = 3; i < n - 3; i++) {
        if (w[i] < '0' || w[i] > '9' || id > UINT64_MAX / 10 - 1) return 0;
        id = id * 10 + (uint64_t)(w[i] - '0');
    }
    return id;
}

/* The registry's names turned around: %{bucket pid => bucket name}, from
 * its state ({names, refs}), or %{} if it is not running. */
static term bucket_names(void) {
    term by_pid = empty_map();
    if (!whereis_proc(alias("KV.Registry"))) return by_pid;
    struct map_iter it;
    term name, pid;
    for (map_iter_start(&it, elem(sys_get_state(alias("KV.Registry")), 0)); map_iter_next(&it, &name, &pid);)
        by_pid = map_insert(by_pid, pid, name);
    return by_pid;
}

/* The process a command names: a pid, a registered name or a bucket's. */
static struct proc *shell_target(term w) {
    uint64_t id = pid_text(BYTES(w), w->n);
    if (id) return proc_of(pid_term(id));
    struct proc *p = whereis_text(BYTES(w), w->n);
    if (p || !whereis_proc(alias("KV.Registry"))) return p;
    term found = kv_registry_lookup(alias("KV.Registry"), w);
    return is_tagged(found, am_ok, 2) ? proc_of(elem(found, 1)) : NULL;
}

/* One line of the tree: pid, then what it is. */
static void tree_line(struct buf *out, const char *indent, const char *branch, term child, term buckets) {
    term id = elem(child, 0), pid = elem(child, 1), type = elem(child, 2), modules = elem(child, 3);
    struct proc *p = is_pid(pid) ? proc_of(pid) : NULL;
    term label = p && p->name ? p->name : id != am_undefined ? id : pid; /* its name, if it has one */
    buf_printf(out, "%s%s", indent, branch);
    inspect_to(out, label);
    if (label != pid && is_pid(pid)) { buf_puts(out, " "); inspect_to(out, pid); }
    buf_puts(out, type == am_supervisor ? " (supervisor" : " (worker");
    if (type == am_supervisor && p) {
        buf_puts(out, ", ");
        inspect_to(out, map_get(sys_get_state(pid), am_strategy, am_nil));
    } else if (is_list(modules) && modules != NIL) {
        buf_puts(out, ", ");
        inspect_to(out, hd(modules));
    }
    buf_puts(out, ")");
    term bucket = is_pid(pid) ? map_lookup(buckets, pid, NULL) : NULL;
    if (bucket) { buf_puts(out, " "); inspect_to(out, bucket); }
    buf_puts(out, "\n");
}

/* The children of sup, in the order they were started, each on its line
 * under indent; supervisors with their own children below them. */
static void tree_children(struct buf *out, term sup, struct buf *indent, term buckets) {
    term children = supervisor_which_children(sup);
    bool dynamic = is_map(map_get(sys_get_state(sup), am_children, NIL));
    if (!dynamic) { /* Supervisor.which_children lists the newest first */
        term oldest_first = NIL;
        for (term l = children; l->kind == K_CONS; l = tl(l)) oldest_first = cons(hd(l), oldest_first);
        children = oldest_first;
    }
    for (term l = children; l->kind == K_CONS; l = tl(l)) {
        bool last = tl(l)->kind != K_CONS;
        tree_line(out, buf_str(indent), last ? "`-- " : "|-- ", hd(l), buckets);
        if (elem(hd(l), 2) == am_supervisor && is_pid(elem(hd(l), 1))) {
            size_t len = indent->len;
            buf_puts(indent, last ? "    " : "|   ");
            tree_children(out, elem(hd(l), 1), indent, buckets);
            indent->len = len;
            indent->s[len] = '\0';
        }
    }
}

/* TREE: the application's tree, from KV.Supervisor down. */
static void shell_tree(struct buf *out) {
    term top = process_whereis(alias("KV.Supervisor"));
    term buckets = bucket_names();
    tree_line(out, "", "", tuple(4, am_undefined, top, am_supervisor, NIL), buckets);
    struct buf indent = {0};
    buf_reserve(&indent, 64);
    buf_puts(&indent, "");
    tree_children(out, top, &indent, buckets);
    buf_free(&indent);
}

/* INFO target: Process.info/1, one item a line, and a GenServer's state's
 * size (as :sys.get_state/1 gives it, in bytes). */
static void shell_info(struct buf *out, struct proc *p) {
    term pid = pid_term(p->pid);
    inspect_to(out, pid);
    buf_puts(out, "\n");
    for (term l = process_info(pid); l->kind == K_CONS; l = tl(l)) {
        term key = elem(hd(l), 0);
        buf_puts(out, "  ");
        buf_add(out, BYTES(key), key->n);
        buf_puts(out, ": ");
        inspect_to(out, elem(hd(l), 1));
        buf_puts(out, "\n");
    }
    if (p->entry == gen_server_main && p != vm.current)
        buf_printf(out, "  state: %zu bytes\n", term_size(sys_get_state(pid)));
}

/* KILL target [reason]: Process.exit(target, reason), :kill if none. */
static void shell_kill(struct buf *out, struct proc *p, term reason) {
    term pid = pid_term(p->pid), name = p->name;
    process_exit(pid, reason);
    buf_puts(out, "OK: sent ");
    inspect_to(out, reason);
    buf_puts(out, " to ");
    inspect_to(out, pid);
    if (name) { buf_puts(out, " ("); inspect_to(out, name); buf_puts(out, ")"); }
    buf_puts(out, "\n");
}

static const char shell_help[] =
    "The guide's protocol (docs-tests-and-with.md):\n"
    "  CREATE bucket | PUT bucket key value | GET bucket key | DELETE bucket key\n"
    "Observer, in text (dynamic-supervisor.md):\n"
    "  TREE                   the supervision tree, with each bucket's name\n"
    "  KILL target [reason]   Process.exit(target, reason), :kill by default; a target\n"
    "                         is a pid (#PID<0.7.0> or <0.7.0>), a registered name\n"
    "                         (KV.Registry) or a bucket's name\n"
    "  INFO target            Process.info/1, and a GenServer's state's size\n"
    "  APP START | APP STOP   Application.start(:kv), Application.stop(:kv)\n"
    "  HELP | QUIT            this, and the end (so does the end of input)\n";

/* ---- The shell's loop ---- */

#define SHELL_LINE_MAX 65536 /* longer lines are read to their end and refused */

/* The answer to one line, appended to out (lines end in "\n"); *quit is
 * set by QUIT.  The protocol's "\r\n" become "\n" here. */
static void shell_run_line(struct buf *out, const char *line, size_t n, bool *quit) {
    term w[COMMAND_WORDS];
    size_t count = split_words(line, n, w, COMMAND_WORDS);
    bool kv_running = whereis_proc(alias("KV.Supervisor")) != NULL;
    if (count == 1 && word_is(w[0], "QUIT")) { *quit = true; return; }
    if (count == 1 && word_is(w[0], "HELP")) { buf_puts(out, shell_help); return; }
    if (count == 2 && word_is(w[0], "APP") && (word_is(w[1], "START") || word_is(w[1], "STOP"))) {
        inspect_to(out, word_is(w[1], "START") ? application_start(am_kv) : application_stop(am_kv));
        buf_puts(out, "\n");
        return;
    }
    bool observer = count >= 1 && (word_is(w[0], "TREE") || word_is(w[0], "KILL") || word_is(w[0], "INFO"));
    term parsed = observer ? NULL : kv_server_command_parse(binary(line, n));
    if (parsed && !is_tagged(parsed, am_ok, 2)) { buf_puts(out, "UNKNOWN COMMAND\n"); return; }
    if (!kv_running && (parsed || (count == 1 && word_is(w[0], "TREE")))) {
        buf_puts(out, "ERROR the :kv application is not running (APP START starts it)\n");
        return;
    }
    if (parsed) {
        term r = kv_server_command_run(elem(parsed, 1));
        if (!is_tagged(r, am_ok, 2)) { buf_puts(out, "NOT FOUND\n"); return; }
        for (const char *s = BYTES(elem(r, 1)), *end = s + elem(r, 1)->n; s < end; s++)
            if (*s != '\r') buf_add(out, s, 1);
        return;
    }
    if (count == 1 && word_is(w[0], "TREE")) { shell_tree(out); return; }
    if ((word_is(w[0], "KILL") && (count == 2 || count == 3)) || (word_is(w[0], "INFO") && count == 2)) {
        struct proc *p = shell_target(w[1]);
        if (!p) {
            buf_puts(out, "ERROR no process, registered name or bucket is called ");
            inspect_to(out, w[1]);
            buf_puts(out, "\n");
        } else if (word_is(w[0], "KILL") && p == vm.current) {
            buf_puts(out, "ERROR that is this shell (QUIT ends it)\n");
        } else if (word_is(w[0], "INFO")) {
            shell_info(out, p);
        } else {
            term reason = am_kill;
            if (count == 3) {
                const char *r = BYTES(w[2]);
                size_t len = w[2]->n;
                if (len && r[0] == ':') r++, len--;
                bool word = len > 0 && len < 256;
                for (size_t i = 0; i < len; i++)
                    word = word && ((r[i] >= 'a' && r[i] <= 'z') || (r[i] >= 'A' && r[i] <= 'Z') ||
                                    (r[i] >= '0' && r[i] <= '9') || r[i] == '_');
                reason = word ? atom_n(r, len) : NULL;
            }
            if (reason) shell_kill(out, p, reason);
            else buf_puts(out, "ERROR a reason is a word of letters, digits and _, such as shutdown\n");
        }
        return;
    }
    buf_puts(out, "UNKNOWN COMMAND\n");
}

struct shell_line {
    struct buf *out;
    const char *line;
    size_t n;
    bool quit;
};

static void shell_run_line_thunk(void *arg) {
    struct shell_line *l = arg;
    shell_run_line(l->out, l->line, l->n, &l->quit);
}

/* shell_run_line, with any exit or raise of the command's (a call that
 * timed out, say) caught and answered as one ERROR line: nothing a line
 * does stops the shell. */
static bool shell_line(struct buf *out, const char *line, size_t n) {
    struct shell_line l = {out, line, n, false};
    size_t before = out->len;
    term reason;
    if (try_catch(shell_run_line_thunk, &l, &reason) != CAUGHT_NOTHING) {
        out->len = before;
        buf_puts(out, "ERROR ");
        struct buf b = {0};
        format_exit_banner(&b, reason);
        for (const char *s = buf_str(&b); *s; s++) buf_add(out, *s == '\n' ? " " : s, 1);
        buf_free(&b);
        buf_puts(out, "\n");
    }
    return !l.quit;
}

/* Let every other process run until all of them wait (for a message, a
 * timer or input): then nothing is left half done when the next line is
 * read, and the output does not depend on timing. */
static void shell_settle(void) {
    while (vm.run_head) erlang_yield();
}

/* Reading lines from a file descriptor, without blocking the VM: the
 * shell waits for input as a process waits for a message (III.4). */
struct line_reader {
    int fd;
    char buf[4096];
    size_t start, end;
    bool eof;
};

/* The next line into line (without its "\n"); false at the end of input.
 * A line longer than SHELL_LINE_MAX is read to its end and dropped, and
 * *too_long says so. */
static bool shell_read_line(struct line_reader *r, struct buf *line, bool *too_long) {
    line->len = 0;
    *too_long = false;
    for (;;) {
        char *nl = r->start < r->end ? memchr(r->buf + r->start, '\n', r->end - r->start) : NULL;
        size_t take = nl ? (size_t)(nl - (r->buf + r->start)) : r->end - r->start;
        if (!*too_long && line->len + take > SHELL_LINE_MAX) *too_long = true;
        if (!*too_long) buf_add(line, r->buf + r->start, take);
        r->start += take;
        if (nl) {
            r->start++;
            return true;
        }
        if (r->eof) return line->len > 0 || *too_long;
        process_wait_input(r->fd);
        ssize_t got = read(r->fd, r->buf, sizeof r->buf);
        r->start = 0;
        r->end = got > 0 ? (size_t)got : 0;
        if (got <= 0) r->eof = true; /* the end, or an error reading: the same for a shell */
    }
}

/* The shell process: start :kv, then answer each line of input.  What it
 * keeps across lines is C memory, for it empties its heap after each. */
static void shell_process(term arg) {
    struct line_reader *r = vm_alloc(sizeof *r);
    r->fd = (int)int_value(arg);
    r->start = r->end = 0;
    r->eof = false;
    bool tty = isatty(r->fd);
    ok_value(application_boot(false));
    struct buf line = {0}, out = {0};
    for (bool more = true; more;) {
        shell_settle();
        if (tty) { printf("kv> "); fflush(stdout); }
        bool too_long;
        if (!shell_read_line(r, &line, &too_long)) break;
        out.len = 0;
        if (too_long) buf_printf(&out, "ERROR the line is longer than %d bytes: nothing was done\n", SHELL_LINE_MAX);
        else more = shell_line(&out, buf_str(&line), line.len);
        fwrite(buf_str(&out), 1, out.len, stdout);
        fflush(stdout);
        garbage_collect(NIL);
    }
    buf_free(&line);
    buf_free(&out);
    vm_free(r);
    if (whereis_proc(alias("KV.Supervisor"))) application_stop(am_kv);
}


//> introduction-to-mix
/* ==========================================================================
 * PART IX — ./kv: THE PROGRAM
 * ==========================================================================
 * Everything above defines; this Part starts it.  First, for the self-test
 * too (kv_test.c includes this file), what any program built on kv.c must
 * do once: start every Part (IX.1).  Then ./kv itself: the chapter's iex
 * sessions, replayed (IX.2).
 * And ./kv shell, Part VIII's shell on standard input,              //> dynamic-supervisor/observer
 * and ./kv bench, the runtime's figures beside BEAM's (IX.3).       //> dynamic-supervisor/supervision-trees
 */

/* --------------------------------------------------------------------------
 * IX.1  Starting every Part
 * --------------------------------------------------------------------------
 * kv_init, at the end of this section, starts the Parts in order; from
 * agents.md on, it loads the modules first listed here.
 */

//> agents
/* ---- The modules ---------------------------------------------------------
 * BEAM loads a module from its .beam file into the code server's table;
 * apply/3 and the behaviours find it there by name (III.10).  kv.c's
 * modules are C, so their table entries are written out here, in one
 * place, after every function they name: each lists the functions apply/3
 * may call (exports) and the callbacks its behaviour calls.  When a later
 * section of the guide rewrites a callback, the function the entry names
 * changes, not the entry.
 */

/* Agent: Agent.start_link/1 and Agent.child_spec/1, for {Agent, fun} children */
static const struct export agent_exports[] = {
    {"start_link", 1, agent_start_link_1},
    {"child_spec", 1, agent_child_spec},
    {NULL, 0, NULL},
};
static const struct module agent_module = {.name = "Agent", .exports = agent_exports};

/* Agent.Server: the gen_server callbacks an agent runs (Part V) */
static const struct module agent_server = {
    .name = "Agent.Server",
    .init = agent_init,
    .handle_call = agent_handle_call,
    .handle_cast = agent_handle_cast,
};

/* KV.  Nothing calls it by name through apply/3.
 * From "The application callback" on, it is :kv's callback module.    //> supervisor-and-application/callback
 */
static const struct module kv_module = {
    .name = "KV",
    .start = kv_start, //> supervisor-and-application/callback
};

/* KV.Bucket */
static const struct export kv_bucket_exports[] = {
    {"start_link", 1, kv_bucket_start_link},
    {"child_spec", 1, kv_bucket_child_spec},
    {NULL, 0, NULL},
};
static const struct module kv_bucket = {.name = "KV.Bucket", .exports = kv_bucket_exports};

//> genservers
/* KV.Registry */
static const struct export kv_registry_exports[] = {
    {"start_link", 1, kv_registry_start_link},
    {"child_spec", 1, kv_registry_child_spec},
    {NULL, 0, NULL},
};
static const struct module kv_registry = {
    .name = "KV.Registry",
    .exports = kv_registry_exports,
    .init = kv_registry_init,
    .handle_call = kv_registry_handle_call,
    .handle_cast = kv_registry_handle_cast,
    .handle_info = kv_registry_handle_info, //> genservers/monitoring
};

//> supervisor-and-application
/* OTP's supervisor, which Elixir's Supervisor calls */
static const struct module supervisor_engine = {
    .name = "supervisor",
    .init = sup_init,
    .handle_call = sup_handle_call,
    .handle_cast = sup_handle_cast,
    .handle_info = sup_handle_info,
    .terminate = sup_terminate,
};

/* Supervisor.Default: the module of Supervisor.start_link(children, opts) */
static const struct module supervisor_default = {.name = "Supervisor.Default", .init = default_init};

/* KV.Supervisor */
static const struct export kv_supervisor_exports[] = {
    {"start_link", 1, kv_supervisor_start_link},
    {"child_spec", 1, kv_supervisor_child_spec},
    {NULL, 0, NULL},
};
static const struct module kv_supervisor = {
    .name = "KV.Supervisor",
    .exports = kv_supervisor_exports,
    .init = kv_supervisor_init,
};

//> supervisor-and-application/naming
/* OTP's application controller (supervisor-and-application.md, "Starting applications") */
static const struct module application_controller = {
    .name = "application_controller",
    .init = ctl_init,
    .handle_call = ctl_handle_call,
    .handle_info = ctl_handle_info,
};

//> dynamic-supervisor/bucket-supervisor
/* DynamicSupervisor */
static const struct export dynamic_supervisor_exports[] = {
    {"start_link", 1, dynamic_supervisor_start_link},
    {"child_spec", 1, dynamic_supervisor_child_spec},
    {NULL, 0, NULL},
};
static const struct module dynamic_supervisor = {
    .name = "DynamicSupervisor",
    .exports = dynamic_supervisor_exports,
    .init = dyn_init,
    .handle_call = dyn_handle_call,
    .handle_cast = dyn_handle_cast,
    .handle_info = dyn_handle_info,
    .terminate = dyn_terminate,
};

//> agents
/* Every module kv.c defines, loaded for apply/3 and the behaviours. */
static void kv_load_modules(void) {
    code_load(&agent_server);
    code_load(&agent_module);
    code_load(&kv_module);
    code_load(&kv_bucket);
    code_load(&kv_registry);            //> genservers
    code_load(&supervisor_engine);      //> supervisor-and-application
    code_load(&supervisor_default);     //> supervisor-and-application
    code_load(&kv_supervisor);          //> supervisor-and-application
    code_load(&application_controller); //> supervisor-and-application/naming
    code_load(&dynamic_supervisor);     //> dynamic-supervisor/bucket-supervisor
}

//> introduction-to-mix
/* Start every Part, in order: its atoms, and, from Part III on, the VM,
 * the exit reasons each Part words, and the modules.
 * The clock is the virtual one for the sessions and the self-test, the    //> agents
 * real one otherwise (III.4).                                             //> agents
 */
static void kv_init(bool virtual_clock) {
/* retired at agents: the VM arrives, and with it the clock
    (void)virtual_clock; // no clock yet
*/
    terms_init();
    vm_init(virtual_clock);                            //> agents
    INIT_ATOMS(GEN_SERVER_ATOMS);                      //> agents
    exit_wording_add(gen_server_exit_wording);         //> agents
    INIT_ATOMS(AGENT_ATOMS);                           //> agents
    INIT_ATOMS(REGISTRY_ATOMS);                        //> genservers
    INIT_ATOMS(SUPERVISOR_ATOMS);                      //> supervisor-and-application
    exit_wording_add(supervisor_exit_wording);         //> supervisor-and-application
    INIT_ATOMS(DYNAMIC_SUPERVISOR_ATOMS);              //> dynamic-supervisor/bucket-supervisor
    INIT_ATOMS(SHELL_ATOMS);                           //> dynamic-supervisor/observer
    kv_load_modules();                                 //> agents
}

#ifndef KV_NO_MAIN /* the self-test, kv_test.c, has a main of its own */

/* --------------------------------------------------------------------------
 * IX.2  ./kv: the chapter's iex sessions, replayed
 * --------------------------------------------------------------------------
 * Each session of the chapter runs here, in order, on kv.c's own code as
 * this chapter leaves it: the `iex>` line says what the guide typed, the
 * line below is what came back, printed as iex prints it (pretty, 80
 * columns).  Pids and references are kv.c's own.  The clock is the
 * virtual one, so nothing waits.  Every chapter's ./kv replays only that
 * chapter (make run plays them all, each with its own stage's binary);
 * the top-level kv.c keeps the earlier chapters' sessions, retired, where
 * they ran.
 */

static void iex_prompt(const char *code) {
    printf("iex> %s\n", code);
    fflush(stdout);
}

static void iex_result(term result) {
    struct buf b = {0};
    inspect_pretty_to(&b, result, 80);
    printf("%s\n", buf_str(&b));
    buf_free(&b);
}

/* iex> code, then its result.  A macro so that the prompt is printed
 * before `expr` runs: whatever expr logs comes after it, as in iex. */
#define iex(code, expr)        \
    do {                       \
        iex_prompt(code);      \
        iex_result(expr);      \
    } while (0)

static void banner(const char *chapter, const char *section) {
    printf("\n# %s, \"%s\"\n\n", chapter, section);
}

static void say(const char *text) { printf("# %s\n", text); }

/* retired at agents: from agents.md on, the sessions run in a process
// introduction-to-mix.md: the doctest `mix new` writes for KV.hello
static void tour_chapter(void) {
    banner("introduction-to-mix.md", "Running tests");
    say("The doctest in KV's documentation, run:");
    iex("KV.hello()", kv_hello());
    say("(The chapter's other session, recompile() in \"Project compilation\", rebuilds the");
    say("project from its sources: for kv.c, that is make.)");
}

static int tour_main(void) {
    kv_init(true);
    printf("kv.c replays the iex sessions of this chapter of Elixir's Mix and OTP guide.\n"
           "(Everything printed as a result is computed here, not copied.)\n");
    tour_chapter();
    terms_shutdown();
    return 0;
}
*/

//> agents
/* The Logger writes among the sessions, as in iex. */
static void print_out(const char *text, size_t len) {
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

/* retired at genservers/monitoring: each chapter's ./kv replays its own sessions
// agents.md's sessions; the funs the guide types in them
static term fn_empty(term env, term x) { (void)env, (void)x; return NIL; }
static term fn_eggs(term env, term l) { (void)env; return cons(string("eggs"), l); }
static term fn_same(term env, term x) { (void)env; return x; }
static term fn_123(term env, term x) { (void)env, (void)x; return integer(123); }
static term fn_wrap(term env, term x) { (void)env; return map(1, atom("a"), x); }
static term fn_12(term env, term x) { (void)env; return cons(integer(12), list(1, x)); }
static term fn_nop(term env, term l) { (void)env; return cons(atom("nop"), l); }
static const struct fun_def tour_funs[] = {
    {"fn_empty", 0, "the tour", fn_empty}, {"fn_eggs", 1, "the tour", fn_eggs},
    {"fn_same", 1, "the tour", fn_same},   {"fn_123", 1, "the tour", fn_123},
    {"fn_wrap", 1, "the tour", fn_wrap},   {"fn_12", 1, "the tour", fn_12},
    {"fn_nop", 1, "the tour", fn_nop},
};
#define TOUR_FUN(i) fun_term(&tour_funs[i], NIL)

static void tour_chapter(void) {
    banner("agents.md", "Agents 101");
    term agent;
    iex("{:ok, agent} = Agent.start_link(fn -> [] end)", tuple(2, am_ok, agent = ok_value(agent_start_link(TOUR_FUN(0), NIL))));
    iex("Agent.update(agent, fn list -> [\"eggs\" | list] end)", agent_update(agent, TOUR_FUN(1)));
    iex("Agent.get(agent, fn list -> list end)", agent_get(agent, TOUR_FUN(2)));
    iex("Agent.stop(agent)", agent_stop(agent, am_normal, am_infinity));
    printf("\n");
    say("Agent.update/3 takes any function of the state:");
    iex("{:ok, agent} = Agent.start_link(fn -> [] end)", tuple(2, am_ok, agent = ok_value(agent_start_link(TOUR_FUN(0), NIL))));
    iex("Agent.update(agent, fn _list -> 123 end)", agent_update(agent, TOUR_FUN(3)));
    iex("Agent.update(agent, fn content -> %{a: content} end)", agent_update(agent, TOUR_FUN(4)));
    iex("Agent.update(agent, fn content -> [12 | [content]] end)", agent_update(agent, TOUR_FUN(5)));
    iex("Agent.update(agent, fn list -> [:nop | list] end)", agent_update(agent, TOUR_FUN(6)));
    iex("Agent.get(agent, fn content -> content end)", agent_get(agent, TOUR_FUN(2)));
}
*/

//> genservers/monitoring
/* retired at supervisor-and-application/callback: each chapter's ./kv replays its own sessions
// genservers.md's sessions
static void tour_chapter(void) {
    banner("genservers.md", "Client-server communication with GenServer");
    term shopping = list(1, tuple(2, am_name, atom("shopping")));
    iex("Agent.start_link(fn -> %{} end, name: :shopping)", agent_start_link(fun_term(&bucket_new_fun, NIL), shopping));
    iex("KV.Bucket.put(:shopping, \"milk\", 1)", kv_bucket_put(atom("shopping"), string("milk"), integer(1)));
    iex("KV.Bucket.get(:shopping, \"milk\")", kv_bucket_get(atom("shopping"), string("milk")));

    banner("genservers.md", "GenServer callbacks");
    term registry;
    iex("{:ok, registry} = GenServer.start_link(KV.Registry, :ok)",
        tuple(2, am_ok, registry = ok_value(gen_server_start_link(alias("KV.Registry"), am_ok, NIL))));
    iex("GenServer.cast(registry, {:create, \"shopping\"})", gen_server_cast(registry, tuple(2, am_create, string("shopping"))));
    iex("{:ok, bk} = GenServer.call(registry, {:lookup, \"shopping\"})",
        gen_server_call(registry, tuple(2, am_lookup, string("shopping"))));

    banner("genservers.md", "The need for monitoring");
    term pid;
    iex("{:ok, pid} = KV.Bucket.start_link([])", tuple(2, am_ok, pid = ok_value(kv_bucket_start_link(NIL))));
    iex("Process.monitor(pid)", process_monitor(pid));
    iex("Agent.stop(pid)", agent_stop(pid, am_normal, am_infinity));
    say("The monitor's message, with the reference monitor returned:");
    iex_prompt("flush()");
    for (term m; (m = receive_now(NULL, NULL));) iex_result(m);
    iex_result(am_ok);
}
*/

//> supervisor-and-application/callback
/* retired at dynamic-supervisor/supervision-trees: each chapter's ./kv replays its own sessions
// supervisor-and-application.md's sessions.  Until "Starting applications"
// the guide's :kv has no callback, so iex starts no tree; kv.c's does, so
// the VM comes up without :kv (iex -S mix run --no-start) until then.

// iex> code, where code exits: iex prints the exit and carries on.
static void iex_exit(const char *code, void (*fn)(void *), void *arg) {
    iex_prompt(code);
    term reason;
    if (try_catch(fn, arg, &reason) == CAUGHT_NOTHING) return;
    struct buf b = {0};
    format_exit_banner(&b, reason);
    printf("%s\n", buf_str(&b));
    buf_free(&b);
}

static void call_bad_input(void *registry) { gen_server_call((term)registry, atom("bad_input")); }

static void tour_chapter(void) {
    ok_value(application_boot(true));
    banner("supervisor-and-application.md", "Our first supervisor");
    term spec = kv_registry_child_spec(NIL);
    say("An older edition of this chapter (its Elixir spelled out the defaults):");
    iex("KV.Registry.child_spec([])", spec);
    say("The guide today (Elixir 1.14 and later write only id and start here):");
    iex("KV.Registry.child_spec([])", child_spec_as_1_14(spec));
    term sup, children;
    iex("{:ok, sup} = KV.Supervisor.start_link([])", tuple(2, am_ok, sup = ok_value(kv_supervisor_start_link(NIL))));
    iex("Supervisor.which_children(sup)", supervisor_which_children(sup));
    iex("[{_, registry, _, _}] = Supervisor.which_children(sup)", children = supervisor_which_children(sup));
    say("This stage's KV.Supervisor names its registry (\"Naming processes\", below), so the");
    say("Logger prints KV.Registry where the guide, before the name, prints the pid:");
    iex_exit("GenServer.call(registry, :bad_input)", call_bad_input, (void *)elem(hd(children), 1));
    iex("Supervisor.which_children(sup)", supervisor_which_children(sup));

    banner("supervisor-and-application.md", "Naming processes");
    say("A new iex session: the supervisor from above goes first.");
    iex("Supervisor.stop(sup)", supervisor_stop(sup, am_normal, am_infinity));
    iex("KV.Supervisor.start_link([])", sup = kv_supervisor_start_link(NIL));
    iex("KV.Registry.create(KV.Registry, \"shopping\")", kv_registry_create(alias("KV.Registry"), string("shopping")));
    iex("KV.Registry.lookup(KV.Registry, \"shopping\")", kv_registry_lookup(alias("KV.Registry"), string("shopping")));
    supervisor_stop(elem(sup, 1), am_normal, am_infinity);

    banner("supervisor-and-application.md", "Understanding applications");
    struct buf b = {0};
    application_resource_file(&b, am_kv);
    say("The file as this chapter ends: \"The application callback\", below, adds its mod: entry");
    say("(and an older edition of the chapter also lists {extra_applications,[logger]}).");
    printf("$ cat _build/dev/lib/kv/ebin/kv.app\n%s", buf_str(&b));
    buf_free(&b);

    banner("supervisor-and-application.md", "Starting applications");
    say("An older edition of this chapter started iex with `iex -S mix run --no-start`,");
    say("leaving :kv to start by hand, as this VM came up:");
    iex("Application.start(:kv)", application_start(am_kv));
    say("The guide today starts iex with `iex -S mix`, which has started :kv already:");
    iex("Application.start(:kv)", application_start(am_kv));
    iex("Application.stop(:kv)", application_stop(am_kv));
    iex("Application.stop(:logger)", application_stop(am_logger));
    iex("Application.start(:kv)", application_start(am_kv));
    iex("Application.ensure_all_started(:kv)", application_ensure_all_started(am_kv));

    banner("supervisor-and-application.md", "The application callback");
    iex("KV.Registry.create(KV.Registry, \"shopping\")", kv_registry_create(alias("KV.Registry"), string("shopping")));
    iex("KV.Registry.lookup(KV.Registry, \"shopping\")", kv_registry_lookup(alias("KV.Registry"), string("shopping")));
    say("The tree the callback started, with its one child:");
    iex("Supervisor.which_children(KV.Supervisor)", supervisor_which_children(alias("KV.Supervisor")));
}
*/

//> dynamic-supervisor/supervision-trees
/* dynamic-supervisor.md's sessions, on the :kv application as `iex -S mix`
 * starts it. */
static void tour_chapter(void) {
    ok_value(application_boot(false));
    banner("dynamic-supervisor.md", "The bucket supervisor");
    term r;
    iex("{:ok, bucket} = DynamicSupervisor.start_child(KV.BucketSupervisor, KV.Bucket)",
        r = dynamic_supervisor_start_child(alias("KV.BucketSupervisor"), alias("KV.Bucket")));
    term bucket = ok_value(r);
    iex("KV.Bucket.put(bucket, \"eggs\", 3)", kv_bucket_put(bucket, string("eggs"), integer(3)));
    iex("KV.Bucket.get(bucket, \"eggs\")", kv_bucket_get(bucket, string("eggs")));

    banner("dynamic-supervisor.md", "Supervision trees");
    say("The tree as the chapter leaves it, newest child first:");
    iex("Supervisor.which_children(KV.Supervisor)", supervisor_which_children(alias("KV.Supervisor")));
    iex("Supervisor.count_children(KV.Supervisor)", supervisor_count_children(alias("KV.Supervisor")));

    banner("dynamic-supervisor.md", "Observer");
    iex("KV.Registry.create(KV.Registry, \"shopping\")", kv_registry_create(alias("KV.Registry"), string("shopping")));
    say("create is a cast; by the time Observer is open, it is done (a lookup waits for it here):");
    iex("KV.Registry.lookup(KV.Registry, \"shopping\")", kv_registry_lookup(alias("KV.Registry"), string("shopping")));
    say("What Observer's tree shows under the bucket supervisor, asked for with which_children:");
    iex("DynamicSupervisor.which_children(KV.BucketSupervisor)",
        dynamic_supervisor_which_children(alias("KV.BucketSupervisor")));
    say("For the rest of what Observer does, the whole tree and killing what you name in it:");   //> dynamic-supervisor/observer
    say("./kv shell, and its TREE, KILL and INFO.");                                             //> dynamic-supervisor/observer
}

//> agents
/* The tour: the sessions run in a process of their own, as iex's do. */
static void tour(term arg) {
    (void)arg;
    tour_chapter();
    exit_self(am_shutdown);
}

static int tour_main(void) {
    kv_init(true);
    vm.out = print_out;
    printf("kv.c replays the iex sessions of this chapter of Elixir's Mix and OTP guide.\n"
           "(Pids and references are kv.c's; everything else is computed here, not copied.)\n");
    uint64_t pid = vm_spawn(tour, NIL, "the tour");
    heap_free(&outside_heap);
    enum vm_result r = vm_run(pid);
    vm_shutdown(); /* whatever the sessions left running goes too */
    return r == VM_DEADLOCK ? 1 : 0;
}

//> dynamic-supervisor/supervision-trees
/* --------------------------------------------------------------------------
 * IX.3  ./kv bench: the runtime's figures
 * --------------------------------------------------------------------------
 * `./kv bench [NAME...]` (make bench) measures the runtime, and the KV
 * application on it, with the workloads that bench/beam.exs runs on BEAM,
 * so that bench/compare.sh can set the two side by side.  Each figure is
 * one line,
 *     RESULT <tab> bench <tab> metric <tab> value <tab> unit
 * Every bench runs in a VM of its own, on the real clock (the sessions
 * run on the virtual one).  A client that loops a million times empties
 * its heap as it goes (garbage_collect), as BEAM's collector would; the
 * terms it keeps (the bucket names) live in a heap of the bench's own.
 */

static double seconds_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static void bench_result(const char *bench, const char *metric, double value, const char *unit) {
    printf("RESULT\t%s\t%s\t%.1f\t%s\n", bench, metric, value, unit);
    fflush(stdout);
}

/* Run fn(arg) as the first process of a fresh VM, to the end. */
static void run_bench(void (*fn)(term), term arg) {
    uint64_t pid = vm_spawn(fn, arg, "bench");
    heap_free(&outside_heap);
    vm_run(pid);
    vm_run(0);
}

/* The generator both sides draw from (bench/beam.exs has its twin): a
 * 31-bit linear congruential one, so that both pick the same buckets. */
static uint32_t bench_next(uint32_t *x) {
    *x = (*x * 1103515245u + 12345u) & 0x7fffffffu;
    return *x;
}

/* ---- switch, ring, spawn: the primitives ---- */

/* The bare cost every switch pays: one _setjmp and one _longjmp.
 * Contract: the jump lands in this same frame, which is live throughout;
 * buf and i are static, so no local changes between the two calls. */
static NOINLINE void bench_switch(void) {
    static jmp_buf buf;
    static volatile long i;
    const long n = 20000000;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < n; i++)
        if (_setjmp(buf) == 0) _longjmp(buf, 1);
    bench_result("switch", "ns_per_switch", seconds_since(&t0) * 1e9 / (double)n, "ns");
}

/* A ring of processes: each receives the token (the hops left) and passes
 * it on.  The first message tells a member who comes next and whom to tell
 * when the token runs out.  Nothing but the message is live between hops,
 * so each member empties its heap as it goes. */
static void ring_member(term arg) {
    (void)arg;
    term first = receive_forever(NULL, NULL); /* {next, main} */
    uint64_t next = elem(first, 0)->u.id, main_pid = elem(first, 1)->u.id;
    garbage_collect(NIL);
    for (;;) {
        int64_t left = int_value(receive_forever(NULL, NULL));
        garbage_collect(NIL);
        if (left == 0) break;
        process_send(pid_term(next), integer(left - 1));
    }
    process_send(pid_term(main_pid), am_ok);
}

static void ring_main(term arg) {
    int64_t n = int_value(elem(arg, 0)), hops = int_value(elem(arg, 1));
    term members = NIL;
    for (int64_t i = 0; i < n; i++) members = cons(spawn_link(ring_member, NIL), members);
    term first = hd(members), m = members;
    for (; m->kind == K_CONS; m = tl(m)) {
        term next = tl(m)->kind == K_CONS ? hd(tl(m)) : first;
        process_send(hd(m), tuple(2, next, self()));
    }
    erlang_yield(); /* every member runs into its receive */
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    process_send(first, integer(hops));
    receive_forever(NULL, NULL);
    double secs = seconds_since(&t0);
    char bench[32];
    snprintf(bench, sizeof bench, "ring_n%" PRId64, n);
    bench_result(bench, "ns_per_hop", secs * 1e9 / (double)hops, "ns");
    exit_self(atom("done")); /* the linked members go with it */
}

static void bench_rings(void) {
    run_bench(ring_main, tuple(2, integer(1000), integer(10000000)));
    vm_shutdown();
    kv_init(false);
    run_bench(ring_main, tuple(2, integer(100000), integer(10000000)));
}

static void exit_at_once(term arg) { (void)arg; }

/* Spawn a process, monitor it, wait for its DOWN; again and again. */
static void spawn_main(term arg) {
    int64_t n = int_value(arg);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        spawn_monitor(exit_at_once, NIL);
        receive_forever(NULL, NULL);
        garbage_collect(NIL);
    }
    bench_result("spawn", "ns_per_spawn", seconds_since(&t0) * 1e9 / (double)n, "ns");
}

static void bench_spawn(void) { run_bench(spawn_main, integer(1000000)); }

/* ---- bulk, idle, max_live: many processes at once ---- */

/* Resident memory of this Unix process, from /proc (Linux), or 0; and
 * its peak (VmHWM), which writing 5 to clear_refs starts again. */
static size_t rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    unsigned long size = 0, resident = 0;
    int n = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    return n == 2 ? (size_t)resident * (size_t)sysconf(_SC_PAGESIZE) : 0;
}

static size_t peak_rss_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    unsigned long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lu kB", &kib) == 1) break;
    fclose(f);
    return (size_t)kib * 1024;
}

static void peak_rss_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return;
    fputs("5", f);
    fclose(f);
}

static void idle(term arg) {
    (void)arg;
    receive_forever(NULL, NULL);
}

/* Wait for one message, then tell the parent and end. */
static void wait_then_report(term parent) {
    receive_forever(NULL, NULL);
    process_send(parent, am_ok);
}

/* A million processes that wait: spawned, then released one by one. */
static void bulk_main(term arg) {
    int64_t n = int_value(arg);
    uint64_t *pids = vm_alloc((size_t)n * sizeof *pids);
    peak_rss_reset();
    size_t rss0 = rss_bytes();
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        pids[i] = spawn(wait_then_report, self())->u.id;
        if (i % 1024 == 0) garbage_collect(NIL);
    }
    erlang_yield(); /* each one runs into its receive */
    bench_result("bulk", "ns_per_spawn", seconds_since(&t0) * 1e9 / (double)n, "ns");
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        process_send(pid_term(pids[i]), am_ok);
        if (i % 1024 == 0) garbage_collect(NIL);
    }
    for (int64_t i = 0; i < n; i++) {
        receive_forever(NULL, NULL);
        if (i % 1024 == 0) garbage_collect(NIL);
    }
    bench_result("bulk", "ns_per_release", seconds_since(&t0) * 1e9 / (double)n, "ns");
    if (rss0) bench_result("bulk", "peak_rss_bytes", (double)(peak_rss_bytes() - rss0), "bytes");
    vm_free(pids);
}

static void bench_bulk(void) {
    vm_set_process_limit(2000000);
    run_bench(bulk_main, integer(1000000));
}

/* n processes, each waiting in receive: what each one costs.  (They are
 * left waiting: the VM's shutdown, at the end of the bench, kills them.) */
static void idle_main(term arg) {
    int64_t n = int_value(arg);
    size_t mem0 = vm_memory(), rss0 = rss_bytes();
    for (int64_t i = 0; i < n; i++) spawn(idle, NIL);
    garbage_collect(NIL);
    erlang_yield(); /* each one runs into its receive */
    double count = (double)n;
    char bench[32];
    snprintf(bench, sizeof bench, n >= 1000000 ? "idle_%" PRId64 "m" : "idle_%" PRId64 "k",
             n >= 1000000 ? n / 1000000 : n / 1000);
    bench_result(bench, "bytes_per_process", (double)(vm_memory() - mem0) / count, "bytes");
    if (rss0) bench_result(bench, "rss_bytes_per_process", (double)(rss_bytes() - rss0) / count, "bytes");
}

static void bench_idle(void) {
    vm_set_process_limit(2000000);
    run_bench(idle_main, integer(100000));
    vm_shutdown();
    kv_init(false);
    vm_set_process_limit(2000000);
    run_bench(idle_main, integer(1000000));
}

/* How many idle processes fit in a budget of resident memory: 4 GiB, or
 * a quarter of the machine's memory if that is less. */
static void max_live_main(term arg) {
    size_t budget = (size_t)int_value(arg), rss0 = rss_bytes();
    int64_t n = 0;
    if (!rss0) return;
    while (rss_bytes() - rss0 < budget) {
        for (int i = 0; i < 65536; i++, n++) spawn(idle, NIL);
        garbage_collect(NIL);
        erlang_yield();
    }
    bench_result("max_live", "processes", (double)n, "processes");
    bench_result("max_live", "budget_mib", (double)(budget >> 20), "MiB");
}

static void bench_max_live(void) {
    size_t budget = (size_t)4 << 30;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && (size_t)pages / 4 * (size_t)page < budget) budget = (size_t)pages / 4 * (size_t)page;
    vm_set_process_limit(SIZE_MAX / 4);
    run_bench(max_live_main, integer((int64_t)budget));
}

/* ---- call, agent: a round trip through OTP's generic server ---- */

/* Bench.Server: handle_call answers the request itself. */
static term bench_server_init(term arg) { return tuple(2, am_ok, arg); }
static term bench_server_handle_call(term request, term from, term state) {
    (void)from;
    return tuple(3, am_reply, request, state);
}
static const struct module bench_server = {
    .name = "Bench.Server",
    .init = bench_server_init,
    .handle_call = bench_server_handle_call,
};

static void call_main(term arg) {
    int64_t n = int_value(arg);
    term server = ok_value(gen_server_start_link(module_atom(&bench_server), NIL, NIL));
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        gen_server_call(server, am_ok);
        if (i % 1024 == 0) server = garbage_collect(server);
    }
    bench_result("call", "ns_per_call", seconds_since(&t0) * 1e9 / (double)n, "ns");
    exit_self(atom("done"));
}

static void bench_call(void) {
    code_load(&bench_server);
    run_bench(call_main, integer(1000000));
}

static term fn_zero(term env, term x) { (void)env, (void)x; return integer(0); }
static term fn_same_state(term env, term x) { (void)env; return x; }
static term fn_plus_one(term env, term x) { (void)env; return integer(int_value(x) + 1); }
static const struct fun_def bench_funs[] = {
    {"fn_zero", 0, "the bench", fn_zero},
    {"fn_same_state", 1, "the bench", fn_same_state},
    {"fn_plus_one", 1, "the bench", fn_plus_one},
};

static void agent_main(term arg) {
    int64_t n = int_value(arg);
    term agent = ok_value(agent_start_link(fun_term(&bench_funs[0], NIL), NIL));
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        agent_get(agent, fun_term(&bench_funs[1], NIL));
        if (i % 1024 == 0) agent = garbage_collect(agent);
    }
    bench_result("agent", "ns_per_get", seconds_since(&t0) * 1e9 / (double)n, "ns");
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        agent_update(agent, fun_term(&bench_funs[2], NIL));
        if (i % 1024 == 0) agent = garbage_collect(agent);
    }
    bench_result("agent", "ns_per_update", seconds_since(&t0) * 1e9 / (double)n, "ns");
    exit_self(atom("done"));
}

static void bench_agent(void) { run_bench(agent_main, integer(1000000)); }

/* ---- kv: the guide's application, under load ---- */

#define KV_OPS 1000000
#define KV_KILLS 1000
#define KV_KEYS 16

/* The :kv application is running; n buckets are created through
 * KV.Registry, then KV_OPS operations each look a bucket up and put or
 * get a key in it, then KV_KILLS buckets are killed, and the bench waits
 * until the registry has forgotten every one. */
static void kv_main(term arg) {
    int64_t n = int_value(arg);
    ok_value(application_boot(false));
    term registry = alias("KV.Registry");
    struct heap kept = {0}; /* the names and keys, outside the client's heap */
    term *names = vm_alloc((size_t)n * sizeof *names), keys[KV_KEYS];
    char text[32];
    for (int64_t i = 0; i < n; i++) {
        snprintf(text, sizeof text, "bucket%" PRId64, i);
        WITH_HEAP(&kept, names[i] = string(text));
    }
    for (int i = 0; i < KV_KEYS; i++) {
        snprintf(text, sizeof text, "key%d", i);
        WITH_HEAP(&kept, keys[i] = string(text));
    }
    char bench[32];
    snprintf(bench, sizeof bench, "kv_%" PRId64 "k", n / 1000);

    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < n; i++) {
        kv_registry_create(registry, names[i]);
        if (i % 1024 == 0) garbage_collect(NIL);
    }
    ok_value(kv_registry_lookup(registry, names[n - 1])); /* after every create */
    bench_result(bench, "create_ms", seconds_since(&t0) * 1e3, "ms");

    uint32_t x = 42;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < KV_OPS; i++) {
        term bucket = ok_value(kv_registry_lookup(registry, names[bench_next(&x) % (uint32_t)n]));
        if (i % 2 == 0) kv_bucket_put(bucket, keys[i % KV_KEYS], integer(i));
        else kv_bucket_get(bucket, keys[i % KV_KEYS]);
        if (i % 32 == 0) garbage_collect(NIL);
    }
    double secs = seconds_since(&t0);
    bench_result(bench, "ops_ms", secs * 1e3, "ms");
    bench_result(bench, "kops_per_s", (double)KV_OPS / secs / 1e3, "kops/s");

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < KV_KILLS; i++) process_exit(ok_value(kv_registry_lookup(registry, names[i])), am_kill);
    for (int64_t i = 0; i < KV_KILLS; i++) {
        while (kv_registry_lookup(registry, names[i]) != am_error) erlang_yield();
        garbage_collect(NIL);
    }
    bench_result(bench, "kill_1000_ms", seconds_since(&t0) * 1e3, "ms");
    vm_free(names);
    heap_free(&kept);
    application_stop(am_kv);
}

static void bench_kv(void) {
    run_bench(kv_main, integer(10000));
    vm_shutdown();
    kv_init(false);
    run_bench(kv_main, integer(100000));
}

/* ---- restart: a supervisor bringing one child back, 10,000 times ---- */

#define RESTARTS 10000

/* Bench.Child.start_link/1: an agent holding 0, named :bench_child. */
static term bench_child_start_link(term arg) {
    (void)arg;
    return agent_start_link(fun_term(&bench_funs[0], NIL), list(1, tuple(2, am_name, atom("bench_child"))));
}
static const struct export bench_child_exports[] = {
    {"start_link", 1, bench_child_start_link},
    {NULL, 0, NULL},
};
static const struct module bench_child = {.name = "Bench.Child", .exports = bench_child_exports};

static void restart_main(term arg) {
    (void)arg;
    term spec = map(2, am_id, atom("child"), am_start, tuple(3, module_atom(&bench_child), am_start_link, list(1, NIL)));
    term opts = list(2, tuple(2, am_strategy, am_one_for_one), tuple(2, am_max_restarts, integer(1000000)));
    term sup = ok_value(supervisor_start_link_children(list(1, spec), opts));
    double *us = vm_alloc(RESTARTS * sizeof *us);
    term name = atom("bench_child");
    for (int i = 0; i < RESTARTS; i++) {
        term old = process_whereis(name), now;
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        process_exit(old, am_kill);
        while ((now = process_whereis(name)) == am_nil || term_eq(now, old)) erlang_yield();
        us[i] = seconds_since(&t0) * 1e6;
        sup = garbage_collect(sup);
    }
    double first = 0, last = 0;
    for (int i = 0; i < 100; i++) first += us[i];
    for (int i = RESTARTS - 1000; i < RESTARTS; i++) last += us[i];
    bench_result("restart", "first_100_us", first / 100, "us");
    bench_result("restart", "last_1000_us", last / 1000, "us");
    vm_free(us);
    supervisor_stop(sup, am_normal, am_infinity);
}

static void bench_restart(void) {
    code_load(&bench_child);
    run_bench(restart_main, NIL);
}

/* The benches, in the order `./kv bench` runs them. */
static const struct bench {
    const char *name;
    void (*run)(void);
} benches[] = {
    {"switch", bench_switch}, {"ring", bench_rings},   {"spawn", bench_spawn}, {"bulk", bench_bulk},
    {"idle", bench_idle},     {"max_live", bench_max_live}, {"call", bench_call}, {"agent", bench_agent},
    {"kv", bench_kv},         {"restart", bench_restart},
};

/* ./kv bench [NAME...]: every bench, or the ones named.  Each runs in a
 * Unix process of its own (fork), so that one bench's memory, given back
 * to malloc but not to the system, does not hide the next one's. */
static int bench_main(int argc, char **argv) {
    size_t n = sizeof benches / sizeof benches[0];
    for (int a = 2; a < argc; a++) {
        size_t i = 0;
        while (i < n && strcmp(argv[a], benches[i].name) != 0) i++;
        if (i == n) {
            fprintf(stderr, "kv bench: no bench named %s; there are:", argv[a]);
            for (i = 0; i < n; i++) fprintf(stderr, " %s", benches[i].name);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    for (size_t i = 0; i < n; i++) {
        bool wanted = argc == 2;
        for (int a = 2; a < argc; a++) wanted = wanted || strcmp(argv[a], benches[i].name) == 0;
        if (!wanted) continue;
        fflush(stdout);
        pid_t child = fork();
        if (child < 0) {
            perror("kv bench: fork");
            return 1;
        }
        if (child == 0) {
            kv_init(false);
            benches[i].run();
            vm_shutdown();
            fflush(stdout);
            _exit(0);
        }
        int status = 0;
        if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "kv bench: %s failed\n", benches[i].name);
            return 1;
        }
    }
    return 0;
}

//> dynamic-supervisor/observer
/* ./kv shell: the shell on standard input. */
static int shell_main(void) {
    kv_init(false);
    uint64_t pid = vm_spawn(shell_process, integer(0), "the shell");
    heap_free(&outside_heap);
    vm_run(pid);
    vm_shutdown();
    return 0;
}

//> introduction-to-mix
/* ./kv: this chapter's sessions.
 * ./kv shell: the protocol, and Observer.   //> dynamic-supervisor/observer
 * ./kv bench: the runtime's figures.        //> dynamic-supervisor/supervision-trees
 */
int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "bench") == 0) return bench_main(argc, argv); //> dynamic-supervisor/supervision-trees
    if (argc == 2 && strcmp(argv[1], "shell") == 0) return shell_main();            //> dynamic-supervisor/observer
    if (argc == 1) return tour_main();
    fprintf(stderr, "usage: %s           replay this chapter's iex sessions\n", argv[0]);
    fprintf(stderr, "       %s shell     the guide's text protocol, and Observer in text\n", argv[0]); //> dynamic-supervisor/observer
    fprintf(stderr, "       %s bench [NAME...]   the runtime's figures\n", argv[0]); //> dynamic-supervisor/supervision-trees
    return 2;
}
#endif
