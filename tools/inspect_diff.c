/*
 * tools/inspect_diff.c: random terms, for comparing kv.c's inspect with
 * Elixir's (tools/inspect_diff.sh runs both; make check runs it).
 *
 *     inspect_diff SEED COUNT TERMS_FILE > kv_says.txt
 *
 * Writes COUNT random terms to TERMS_FILE as one list in Erlang's external
 * term format (what :erlang.term_to_binary/1 writes), and prints, for each,
 * a "### N" line, inspect(term) and inspect(term, pretty: true, width: 80),
 * as kv.c prints them.  The terms are those kv.c and Elixir 1.14 print the
 * same way by design: integers, atoms (their text as below), binaries (text and bytes), tuples,
 * lists (charlists, keyword lists and improper ones among them) and maps
 * of up to 32 keys (past that, BEAM prints in hash order and kv.c in key
 * order: README).  Pids, references and funs print with numbers of each
 * VM's own, so they are left out.
 */
#define KV_NO_MAIN
#include "../kv.c"

static uint64_t state;

static uint64_t next(void) { /* xorshift64 */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
}

static int below(int n) { return (int)(next() % (uint64_t)n); }

/* ---- random terms ---- */

static const char *const atom_pool[] = {
    "ok", "error", "nil", "true", "false", "Elixir.KV.Registry", "Elixir.Foo", "foo bar", "ok?", "+", "::",
    "@", "a@b", "9a", "A", "a-b", "$gen_call", "Elixir", "Elixir.kv", "é", "__struct__", "shutdown", "",
    "\\", "foo!", "=>", "..", "...", "%", "&", "||", "<<>>", "%{}", "{}", "do", "end", "ß", "日本", "Ünter",
};
/* (Atoms of other non-ASCII text print differently: kv.c takes every
 * character past ASCII for a letter, where Elixir applies Unicode's
 * identifier rules, quoting :"€", and :"é" spelled e + U+0301, whose
 * composed form differs.) */

static term random_binary(void) {
    char bytes[40];
    int n = below(12);
    int style = below(4);
    for (int i = 0; i < n; i++) {
        if (style == 0) bytes[i] = (char)below(256);                       /* any bytes */
        else if (style == 1) bytes[i] = (char)(32 + below(95));             /* printable ASCII */
        else if (style == 2) bytes[i] = "ab\n\t\"\\#{}\x1b\a"[below(13)];   /* escapes */
        else bytes[i] = (char)"\xc3\xa9\xe2\x82\xac"[below(5)];            /* UTF-8, or pieces of it */
    }
    return binary(bytes, (size_t)n);
}

static term random_integer(void) {
    switch (below(4)) {
    case 0: return integer(below(256));
    case 1: return integer((int64_t)(next() % 2000001) - 1000000);
    case 2: return integer((int64_t)next());
    default: return integer(32 + below(95)); /* a character, for charlists */
    }
}

static term random_term(int depth);

static term random_list(int depth) {
    int n = below(6), style = below(5);
    term items[8];
    for (int i = 0; i < n; i++) {
        if (style == 0) items[i] = integer(32 + below(95)); /* a charlist */
        else if (style == 1) items[i] = tuple(2, atom(atom_pool[below(12)]), random_term(depth + 1)); /* keyword */
        else items[i] = random_term(depth + 1);
    }
    term l = style == 2 && n > 0 ? random_term(depth + 1) : NIL; /* an improper tail, sometimes */
    for (int i = n; i-- > 0;) l = cons(items[i], l);
    return l;
}

static term random_map(int depth) {
    term m = empty_map();
    int n = below(5) == 0 ? 20 + below(13) : below(5); /* up to 32 keys */
    bool atoms = below(2);
    for (int i = 0; i < n; i++) {
        term key = atoms ? atom(atom_pool[below((int)(sizeof atom_pool / sizeof *atom_pool))]) : random_term(depth + 2);
        m = map_insert(m, key, random_term(depth + 1));
    }
    return m;
}

static term random_term(int depth) {
    int pick = depth > 4 ? below(3) : below(7);
    switch (pick) {
    case 0: return random_integer();
    case 1: return atom(atom_pool[below((int)(sizeof atom_pool / sizeof *atom_pool))]);
    case 2: return random_binary();
    case 3: {
        int n = below(5);
        term items[5];
        for (int i = 0; i < n; i++) items[i] = random_term(depth + 1);
        return tuple_of((size_t)n, items);
    }
    case 4: return random_list(depth);
    case 5: return random_map(depth);
    default: {
        int n = 40 + below(30); /* long enough for inspect's limit of 50 */
        term l = NIL;
        for (int i = 0; i < n; i++) l = cons(integer(below(1000)), l);
        return l;
    }
    }
}

/* ---- the external term format ---- */

static void put_u8(struct buf *b, unsigned v) { char c = (char)v; buf_add(b, &c, 1); }
static void put_u16(struct buf *b, unsigned v) { put_u8(b, v >> 8), put_u8(b, v & 0xff); }
static void put_u32(struct buf *b, uint32_t v) { put_u16(b, v >> 16), put_u16(b, v & 0xffff); }

static void etf(struct buf *b, term t) {
    switch ((enum kind)t->kind) {
    case K_INT: {
        int64_t i = int_value(t);
        if (i >= 0 && i <= 255) { put_u8(b, 97), put_u8(b, (unsigned)i); return; }
        if (i >= INT32_MIN && i <= INT32_MAX) { put_u8(b, 98), put_u32(b, (uint32_t)(int32_t)i); return; }
        uint64_t mag = i < 0 ? (uint64_t)0 - (uint64_t)i : (uint64_t)i;
        int n = 0;
        for (uint64_t m = mag; m; m >>= 8) n++;
        put_u8(b, 110), put_u8(b, (unsigned)n), put_u8(b, i < 0); /* SMALL_BIG_EXT, little-endian */
        for (int k = 0; k < n; k++) put_u8(b, (unsigned)((mag >> (8 * k)) & 0xff));
        return;
    }
    case K_ATOM: put_u8(b, 118), put_u16(b, t->n), buf_add(b, BYTES(t), t->n); return;
    case K_BIN: put_u8(b, 109), put_u32(b, t->n), buf_add(b, BYTES(t), t->n); return;
    case K_TUPLE:
        put_u8(b, 104), put_u8(b, t->n);
        for (size_t i = 0; i < t->n; i++) etf(b, elem(t, i));
        return;
    case K_NIL: put_u8(b, 106); return;
    case K_CONS: {
        uint32_t n = 0;
        term l = t;
        for (; l->kind == K_CONS; l = tl(l)) n++;
        put_u8(b, 108), put_u32(b, n);
        for (l = t; l->kind == K_CONS; l = tl(l)) etf(b, hd(l));
        etf(b, l); /* the tail */
        return;
    }
    case K_MAP: {
        put_u8(b, 116), put_u32(b, t->n);
        struct map_iter it;
        term k, v;
        for (map_iter_start(&it, t); map_iter_next(&it, &k, &v);) etf(b, k), etf(b, v);
        return;
    }
    default: abort(); /* not generated */
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SEED COUNT TERMS_FILE\n", argv[0]);
        return 2;
    }
    state = strtoull(argv[1], NULL, 10) | 1;
    long count = atol(argv[2]);
    terms_init();
    struct buf out = {0}, ext = {0};
    put_u8(&ext, 131), put_u8(&ext, 108), put_u32(&ext, (uint32_t)count);
    for (long i = 0; i < count; i++) {
        term t = random_term(0);
        etf(&ext, t);
        out.len = 0;
        buf_printf(&out, "### %ld\n", i);
        inspect_to(&out, t);
        buf_puts(&out, "\n");
        inspect_pretty_to(&out, t, 80);
        buf_puts(&out, "\n");
        fwrite(buf_str(&out), 1, out.len, stdout);
        heap_free(&outside_heap);
    }
    put_u8(&ext, 106);
    FILE *f = fopen(argv[3], "wb");
    if (!f || fwrite(buf_str(&ext), 1, ext.len, f) != ext.len || fclose(f) != 0) {
        perror(argv[3]);
        return 1;
    }
    buf_free(&out);
    buf_free(&ext);
    terms_shutdown();
    return 0;
}
