/*
 * fuzz/shell_fuzz.c: the shell's line handling and KVServer.Command.parse,
 * under a fuzzer (make check runs it; tools/check.sh says how).
 *
 *     clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined fuzz/shell_fuzz.c
 *     mkdir -p new && ./a.out -max_total_time=60 new fuzz/corpus   (libFuzzer;
 *         what it finds goes to new/, the kept corpus stays as it is)
 *     afl-clang-fast -std=c99 -DKV_AFL fuzz/shell_fuzz.c   (AFL++: input on stdin)
 *
 * Each input is split into lines, as ./kv shell reads them, and each line
 * goes to the shell's own handler (shell_line, Part VIII) with the :kv
 * application running, the VM settled after each as the shell settles it;
 * the whole input also goes to KVServer.Command.parse/1 as one line.
 * Nothing it holds may crash the VM, leak, or hang: the sanitizers and
 * the fuzzer's time limit watch for crashes and hangs, and every input
 * runs in a VM of its own, shut down afterwards, after which kv.c's two
 * counts of memory (vm_memory, vm_memory_system) must both be exactly 0:
 * a leak of a single byte aborts.  LeakSanitizer looks too, after each
 * input that mallocs more than it frees, and at exit.
 */
#define KV_NO_MAIN
#include "../kv.c"

static const uint8_t *input;
static size_t input_len;

static void fuzz_one(term arg) {
    (void)arg;
    ok_value(application_boot(false));
    kv_server_command_parse(binary((const char *)input, input_len));
    struct buf out = {0};
    for (size_t at = 0; at <= input_len;) {
        const uint8_t *nl = memchr(input + at, '\n', input_len - at);
        size_t n = nl ? (size_t)(nl - (input + at)) : input_len - at;
        if (n > SHELL_LINE_MAX) n = SHELL_LINE_MAX; /* the reader refuses longer lines */
        out.len = 0;
        bool more = shell_line(&out, (const char *)input + at, n);
        shell_settle();
        garbage_collect(NIL);
        if (!more || !nl) break;
        at += (size_t)(nl - (input + at)) + 1;
    }
    buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kv_init(true);
    input = data;
    input_len = size;
    vm_run(vm_spawn(fuzz_one, NIL, "the fuzzed shell"));
    vm_shutdown();
    if (vm_memory() != 0 || vm_memory_system() != 0) {
        fprintf(stderr, "shell_fuzz: %zu bytes of processes' and %zu of the VM's left after the input\n",
                vm_memory(), vm_memory_system());
        abort();
    }
    return 0;
}

#ifdef KV_AFL
/* AFL++ runs the program once per input, on standard input. */
int main(void) {
    static uint8_t data[1 << 20];
    size_t n = fread(data, 1, sizeof data, stdin);
    LLVMFuzzerTestOneInput(data, n);
    return 0;
}
#endif
