/* Escape probe: calls each system call named on the command line (with null arguments) and
 * prints "<name> <errno name or OK>", one line each. Built static by the tests and copied into
 * a CT, where busybox has no tool that makes arbitrary system calls. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const struct { const char *name; long nr; } calls[] = {
    {"bpf", SYS_bpf},
    {"kexec_load", SYS_kexec_load},
    {"kexec_file_load", SYS_kexec_file_load},
    {"init_module", SYS_init_module},
    {"finit_module", SYS_finit_module},
    {"delete_module", SYS_delete_module},
    {"open_by_handle_at", SYS_open_by_handle_at},
    {"perf_event_open", SYS_perf_event_open},
    {"add_key", SYS_add_key},
    {"request_key", SYS_request_key},
    {"keyctl", SYS_keyctl},
    {"iopl", SYS_iopl},
    {"ioperm", SYS_ioperm},
    {"swapon", SYS_swapon},
    {"swapoff", SYS_swapoff},
    {"acct", SYS_acct},
    {"getpid", SYS_getpid},
};

int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        long nr = -1;
        for (unsigned i = 0; i < sizeof calls / sizeof calls[0]; i++)
            if (strcmp(calls[i].name, argv[a]) == 0)
                nr = calls[i].nr;
        if (nr < 0) {
            printf("%s UNKNOWN\n", argv[a]);
            continue;
        }
        errno = 0;
        long r = syscall(nr, 0, 0, 0, 0, 0, 0);
        printf("%s %s\n", argv[a], r == -1 ? strerrorname_np(errno) : "OK");
    }
    return 0;
}
