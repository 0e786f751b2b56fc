/* cgroup probe: runs each operation named on the command line and prints
 * "<op> <path> <errno name or OK>", one line each, so a test can tell which kernel check
 * refused it. Built static by the tests and copied into a CT.
 *   write PATH VALUE        open(O_WRONLY) + one write(2), as cgroupfs wants
 *   writeself PATH          writes the probe's own pid
 *   mount OPTS TARGET       mkdir TARGET, mount("cgroup", TARGET, "cgroup", nosuid|nodev|noexec, OPTS)
 *   mkdir PATH / rmdir PATH
 *   open PATH               open(O_RDONLY)                                                    */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static void report(const char *op, const char *path, int ok) {
    printf("%s %s %s\n", op, path, ok ? "OK" : strerrorname_np(errno));
    fflush(stdout);
}

static int do_write(const char *path, const char *value) {
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return 0;
    ssize_t n = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)strlen(value);
}

int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        const char *op = argv[a];
        if (strcmp(op, "write") == 0 && a + 2 < argc) {
            report(op, argv[a + 1], do_write(argv[a + 1], argv[a + 2]));
            a += 2;
        } else if (strcmp(op, "writeself") == 0 && a + 1 < argc) {
            char pid[32];
            snprintf(pid, sizeof pid, "%d", getpid());
            report(op, argv[a + 1], do_write(argv[a + 1], pid));
            a += 1;
        } else if (strcmp(op, "mount") == 0 && a + 2 < argc) {
            mkdir(argv[a + 2], 0755);
            report(op, argv[a + 1],
                   mount("cgroup", argv[a + 2], "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                         argv[a + 1]) == 0);
            a += 2;
        } else if (strcmp(op, "mkdir") == 0 && a + 1 < argc) {
            report(op, argv[a + 1], mkdir(argv[a + 1], 0755) == 0);
            a += 1;
        } else if (strcmp(op, "rmdir") == 0 && a + 1 < argc) {
            report(op, argv[a + 1], rmdir(argv[a + 1]) == 0);
            a += 1;
        } else if (strcmp(op, "open") == 0 && a + 1 < argc) {
            int fd = open(argv[a + 1], O_RDONLY);
            report(op, argv[a + 1], fd >= 0);
            if (fd >= 0)
                close(fd);
            a += 1;
        } else {
            printf("%s ? UNKNOWN\n", op);
            return 2;
        }
    }
    return 0;
}
