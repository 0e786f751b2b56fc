/* Escape probes: each tries one way out of a CT towards host state and prints one line,
 *     <probe> BLOCKED <errno name> <step that failed>
 *     <probe> ALLOWED - <what it reached>
 * Usage: escape-probe <host pid> [probe...]   (no probe names: all of them, in table order)
 * <host pid> is a process that exists only outside the CT (the test's own, as the host sees it).
 *
 * Nothing here writes host state: a probe that reaches a host-global file opens it O_WRONLY and
 * closes it unwritten (the open is the finding), and every mount is made in the CT's own mount
 * namespace on a scratch directory and unmounted again. The one write is to the release_agent of
 * a cgroup v1 hierarchy this probe just created, and only inside a user namespace, where the
 * kernel refuses it (cgroup_release_agent_write: init_user_ns only) and the hierarchy dies at
 * the unmount. Built static by tests/tests/isolation.rs: busybox has no tool for most of these. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#define SCRATCH "/tmp/escape-probe"

static int host_pid;

static void blocked(const char *probe, int err, const char *step) {
    printf("%s BLOCKED %s %s\n", probe, strerrorname_np(err), step);
}

static void allowed(const char *probe, const char *what) {
    printf("%s ALLOWED - %s\n", probe, what);
}

/* Makes the scratch mount point SCRATCH/<name> and writes its path into buf. */
static void scratch(const char *name, char *buf, size_t len) {
    mkdir(SCRATCH, 0700);
    snprintf(buf, len, SCRATCH "/%s", name);
    mkdir(buf, 0700);
}

static void unscratch(const char *dir) {
    umount2(dir, MNT_DETACH);
    rmdir(dir);
}

/* Opens `path` for writing and closes it unwritten; reports under `probe`. */
static void open_wr(const char *probe, const char *path, const char *step) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        blocked(probe, errno, step);
        return;
    }
    close(fd);
    char what[512];
    snprintf(what, sizeof what, "%s-opened-for-writing", step);
    allowed(probe, what);
}

/* Mounts a fresh filesystem on a scratch dir, then opens `rel` below it for writing. */
static void fresh_open_wr(const char *probe, const char *fstype, const char *data,
                          const char *rel) {
    char dir[256], path[512], step[128];
    scratch(probe, dir, sizeof dir);
    if (mount(fstype, dir, fstype, MS_NOSUID | MS_NODEV | MS_NOEXEC, data) != 0) {
        snprintf(step, sizeof step, "mount-%s", fstype);
        blocked(probe, errno, step);
    } else {
        snprintf(path, sizeof path, "%s/%s", dir, rel);
        snprintf(step, sizeof step, "open-wr:%s", rel);
        open_wr(probe, path, step);
    }
    unscratch(dir);
}

static void p_procfs_core_pattern(const char *n) { fresh_open_wr(n, "proc", NULL, "sys/kernel/core_pattern"); }
static void p_procfs_modprobe(const char *n) { fresh_open_wr(n, "proc", NULL, "sys/kernel/modprobe"); }
static void p_procfs_drop_caches(const char *n) { fresh_open_wr(n, "proc", NULL, "sys/vm/drop_caches"); }
static void p_procfs_sysrq(const char *n) { fresh_open_wr(n, "proc", NULL, "sysrq-trigger"); }
static void p_proc_core_pattern(const char *n) { open_wr(n, "/proc/sys/kernel/core_pattern", "open-wr:/proc/sys/kernel/core_pattern"); }

/* Entries of /proc/sys scoped to a namespace the CT owns (net, user, ipc, mqueue, uts, pid): a
 * CT may write these by design. Everything else is host-global. kernel/pid_max is per pid
 * namespace since 6.14 (a child's may not exceed its parent's); ns_last_pid always was. */
static int namespaced_sysctl(const char *rel) {
    static const char *const prefixes[] = {"net/", "user/", "fs/mqueue/"};
    static const char *const ipc_uts[] = {
        "kernel/msgmax", "kernel/msgmnb", "kernel/msgmni", "kernel/msg_next_id", "kernel/sem",
        "kernel/sem_next_id", "kernel/shmall", "kernel/shmmax", "kernel/shmmni",
        "kernel/shm_next_id", "kernel/shm_rmid_forced", "kernel/auto_msgmni",
        "kernel/hostname", "kernel/domainname", "kernel/ns_last_pid"};
    static int pid_max_per_ns = -1;
    if (pid_max_per_ns < 0) {
        struct utsname u;
        int major = 0, minor = 0;
        if (uname(&u) == 0)
            sscanf(u.release, "%d.%d", &major, &minor);
        pid_max_per_ns = major > 6 || (major == 6 && minor >= 14);
    }
    if (pid_max_per_ns && strcmp(rel, "kernel/pid_max") == 0)
        return 1;
    for (unsigned i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++)
        if (strncmp(rel, prefixes[i], strlen(prefixes[i])) == 0)
            return 1;
    for (unsigned i = 0; i < sizeof ipc_uts / sizeof ipc_uts[0]; i++)
        if (strcmp(rel, ipc_uts[i]) == 0)
            return 1;
    return 0;
}

struct walk {
    int files, writable, errs[4096];
    char first[768];
};

static void walk_sysctls(const char *base, const char *rel, struct walk *w) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", base, rel);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char sub[768];
        snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", e->d_name);
        if (e->d_type == DT_DIR) {
            walk_sysctls(base, sub, w);
            continue;
        }
        if (namespaced_sysctl(sub))
            continue;
        w->files++;
        snprintf(path, sizeof path, "%s/%s", base, sub);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            close(fd);
            /* The first few by name, so a short list names every one of them. */
            size_t used = strlen(w->first), len = strlen(sub);
            if (w->writable++ < 6 && used + len + 2 < sizeof w->first) {
                if (used)
                    w->first[used++] = ',';
                memcpy(w->first + used, sub, len + 1);
            }
        } else if (errno < 4096) {
            w->errs[errno]++;
        }
    }
    closedir(d);
}

static void report_walk(const char *probe, struct walk *w) {
    char what[1000];
    if (w->writable) {
        snprintf(what, sizeof what, "%d/%d-host-global-sysctls-open-for-writing(%s%s)",
                 w->writable, w->files, w->first, w->writable > 6 ? ",..." : "");
        allowed(probe, what);
        return;
    }
    int top = 0;
    for (int i = 1; i < 4096; i++)
        if (w->errs[i] > w->errs[top])
            top = i;
    snprintf(what, sizeof what, "open-wr-of-%d-host-global-sysctls(%d-with-this-errno)",
             w->files, w->errs[top]);
    blocked(probe, top, what);
}

/* Every host-global sysctl of the CT's own /proc/sys. */
static void p_proc_sys_walk(const char *n) {
    struct walk w = {0};
    walk_sysctls("/proc/sys", "", &w);
    report_walk(n, &w);
}

/* Every host-global sysctl of a freshly mounted procfs (no read-only bind over sys/). */
static void p_procfs_sys_walk(const char *n) {
    char dir[256];
    scratch(n, dir, sizeof dir);
    if (mount("proc", dir, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        blocked(n, errno, "mount-proc");
    } else {
        char base[300];
        snprintf(base, sizeof base, "%s/sys", dir);
        struct walk w = {0};
        walk_sysctls(base, "", &w);
        report_walk(n, &w);
    }
    unscratch(dir);
}

/* The CT's own /proc/sysrq-trigger: absent (kernel without magic SysRq) or masked. */
static void p_proc_sysrq(const char *n) {
    int fd = open("/proc/sysrq-trigger", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        blocked(n, errno, "open-wr:/proc/sysrq-trigger");
        return;
    }
    struct stat st;
    int masked = fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3);
    close(fd);
    if (masked)
        printf("%s BLOCKED MASKED /proc/sysrq-trigger-is-/dev/null\n", n);
    else
        allowed(n, "/proc/sysrq-trigger-opened-for-writing");
}

/* A host-global sysfs attribute (transparent hugepages: present on every x86-64 kernel here). */
#define SYSFS_GLOBAL "kernel/mm/transparent_hugepage/enabled"

static void p_sysfs_fresh_rw(const char *n) { fresh_open_wr(n, "sysfs", NULL, SYSFS_GLOBAL); }

static void p_sysfs_remount_rw(const char *n) {
    if (mount(NULL, "/sys", NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        blocked(n, errno, "remount-rw:/sys");
        return;
    }
    open_wr(n, "/sys/" SYSFS_GLOBAL, "remounted-rw,open-wr:/sys/" SYSFS_GLOBAL);
    mount(NULL, "/sys", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

static long sys_bpf(int cmd, union bpf_attr *attr) {
    return syscall(SYS_bpf, cmd, attr, sizeof *attr);
}

/* bpf(2) by id: the next id after 0, then an fd for it (closed at once). */
static void bpf_by_id(const char *n, int next_cmd, int fd_cmd, const char *kind) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    char step[64];
    snprintf(step, sizeof step, "BPF_%s_GET_NEXT_ID", kind);
    if (sys_bpf(next_cmd, &a) != 0) {
        blocked(n, errno, step);
        return;
    }
    unsigned id = a.next_id;
    memset(&a, 0, sizeof a);
    if (fd_cmd == BPF_MAP_GET_FD_BY_ID)
        a.map_id = id;
    else if (fd_cmd == BPF_PROG_GET_FD_BY_ID)
        a.prog_id = id;
    else
        a.link_id = id;
    snprintf(step, sizeof step, "BPF_%s_GET_FD_BY_ID(%u)", kind, id);
    long fd = sys_bpf(fd_cmd, &a);
    if (fd < 0) {
        blocked(n, errno, step);
        return;
    }
    close(fd);
    char what[96];
    snprintf(what, sizeof what, "%s-id-%u-opened", kind, id);
    allowed(n, what);
}

static void p_bpf_map(const char *n) { bpf_by_id(n, BPF_MAP_GET_NEXT_ID, BPF_MAP_GET_FD_BY_ID, "MAP"); }
static void p_bpf_prog(const char *n) { bpf_by_id(n, BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, "PROG"); }
static void p_bpf_link(const char *n) { bpf_by_id(n, BPF_LINK_GET_NEXT_ID, BPF_LINK_GET_FD_BY_ID, "LINK"); }

/* A fresh bpffs instance is empty; what it would be for is pinning or getting objects through
 * bpf(2), so after the mount the probe pins nothing but asks bpf(BPF_OBJ_GET) for a path in it. */
static void p_bpffs(const char *n) {
    char dir[256];
    scratch(n, dir, sizeof dir);
    if (mount("bpf", dir, "bpf", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        blocked(n, errno, "mount-bpf");
    } else {
        char path[300];
        snprintf(path, sizeof path, "%s/x", dir);
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.pathname = (unsigned long)path;
        long fd = sys_bpf(BPF_OBJ_GET, &a);
        if (fd >= 0) {
            close(fd);
            allowed(n, "mounted,BPF_OBJ_GET-answered");
        } else if (errno == ENOENT) {
            /* bpf(2) itself is usable: the mount is a working bpffs. */
            allowed(n, "mounted,bpf(2)-usable(BPF_OBJ_GET:ENOENT)");
        } else {
            blocked(n, errno, "mounted,then-bpf(BPF_OBJ_GET)");
        }
    }
    unscratch(dir);
}

static void p_debugfs(const char *n) {
    char dir[256];
    scratch(n, dir, sizeof dir);
    if (mount("debugfs", dir, "debugfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        blocked(n, errno, "mount-debugfs");
    else
        allowed(n, "debugfs-mounted");
    unscratch(dir);
}

/* Fails closed: an unreadable uid_map counts as the initial user namespace (no write). */
static int in_user_namespace(void) {
    FILE *f = fopen("/proc/self/uid_map", "r");
    if (!f)
        return 0;
    unsigned inner, outer, count;
    int full = fscanf(f, "%u %u %u", &inner, &outer, &count) == 3 && inner == 0 &&
               outer == 0 && count == 4294967295u;
    fclose(f);
    return !full;
}

/* A new, empty cgroup v1 hierarchy has its own root and so a release_agent (the kernel runs it
 * as host root when a cgroup with notify_on_release empties: CVE-2022-0492). */
static void p_cgroup1_release_agent(const char *n) {
    char dir[256], path[300];
    scratch(n, dir, sizeof dir);
    if (mount("cgroup", dir, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "none,name=berth-escape-probe") != 0) {
        blocked(n, errno, "mount-cgroup-none,name=berth-escape-probe");
        unscratch(dir);
        return;
    }
    snprintf(path, sizeof path, "%s/release_agent", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        blocked(n, errno, "mounted,open-wr:release_agent");
    } else if (!in_user_namespace()) {
        /* Outside a user namespace the write would be accepted: the open is the finding. */
        allowed(n, "mounted,release_agent-opened-for-writing(not-written)");
    } else if (write(fd, "/bin/true", 9) < 0) {
        blocked(n, errno, "mounted,opened,write:release_agent");
    } else {
        allowed(n, "mounted,release_agent-written");
    }
    if (fd >= 0)
        close(fd);
    unscratch(dir);
}

/* The release_agent of an existing hierarchy, mounted through the CT's cgroup namespace: its
 * root is the CT's own cgroup, which has none (the file lives only in a hierarchy's root). */
static void p_cgroup1_memory_release_agent(const char *n) {
    fresh_open_wr(n, "cgroup", "memory", "release_agent");
}

/* The CT's own limits, in each hierarchy mounted through its cgroup namespace. */
static void p_cg_memory(const char *n) { fresh_open_wr(n, "cgroup", "memory", "memory.limit_in_bytes"); }
static void p_cg_pids(const char *n) { fresh_open_wr(n, "cgroup", "pids", "pids.max"); }
static void p_cg_cpu(const char *n) { fresh_open_wr(n, "cgroup", "cpu", "cpu.cfs_quota_us"); }
static void p_cg_devices(const char *n) { fresh_open_wr(n, "cgroup", "devices", "devices.allow"); }

/* The same files in cgroup v2: the CT's cgroup there, or ENOENT where no controller is on v2. */
static void p_cg2(const char *n) {
    static const char *const files[] = {"memory.max", "pids.max", "cpu.max"};
    char dir[256], path[300];
    scratch(n, dir, sizeof dir);
    if (mount("cgroup2", dir, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        blocked(n, errno, "mount-cgroup2");
        unscratch(dir);
        return;
    }
    int err = 0;
    for (unsigned i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            close(fd);
            char what[64];
            snprintf(what, sizeof what, "mounted,%s-opened-for-writing", files[i]);
            allowed(n, what);
            unscratch(dir);
            return;
        }
        if (!err || errno != ENOENT)
            err = errno;
    }
    blocked(n, err, "mounted,open-wr:memory.max,pids.max,cpu.max");
    unscratch(dir);
}

/* Limit files (and a release_agent) at the root of every cgroup filesystem already mounted in
 * the CT, such as a delegated name=systemd subtree. */
static void p_cg_mounted(const char *n) {
    static const char *const files[] = {"memory.limit_in_bytes", "memory.max", "pids.max",
                                        "cpu.cfs_quota_us", "cpu.max", "devices.allow",
                                        "release_agent"};
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[4096];
    int mounts = 0, err = ENOENT;
    while (f && fgets(line, sizeof line, f)) {
        char mp[1024], fstype[64];
        const char *sep = strstr(line, " - ");
        if (!sep || sscanf(sep + 3, "%63s", fstype) != 1 ||
            (strcmp(fstype, "cgroup") != 0 && strcmp(fstype, "cgroup2") != 0) ||
            sscanf(line, "%*s %*s %*s %*s %1023s", mp) != 1)
            continue;
        mounts++;
        for (unsigned i = 0; i < sizeof files / sizeof files[0]; i++) {
            char path[1100];
            snprintf(path, sizeof path, "%s/%s", mp, files[i]);
            int fd = open(path, O_WRONLY | O_CLOEXEC);
            if (fd >= 0) {
                close(fd);
                snprintf(line, sizeof line, "%s-opened-for-writing", path);
                allowed(n, line);
                fclose(f);
                return;
            }
            if (errno != ENOENT)
                err = errno;
        }
    }
    if (f)
        fclose(f);
    snprintf(line, sizeof line, "open-wr-of-limit-files-in-%d-mounted-cgroupfs", mounts);
    blocked(n, err, line);
}

/* name_to_handle_at works on the CT's own files; open_by_handle_at with that handle must not
 * (with a handle, any inode of the filesystem opens, bypassing the CT's root: "shocker"). */
static void p_open_by_handle(const char *n) {
    static const char *const paths[] = {"/", "/bin", "/tmp", "/dev"};
    struct {
        struct file_handle fh;
        unsigned char space[MAX_HANDLE_SZ];
    } h;
    const char *got = NULL;
    int mount_id;
    for (unsigned i = 0; i < sizeof paths / sizeof paths[0] && !got; i++) {
        h.fh.handle_bytes = MAX_HANDLE_SZ;
        if (name_to_handle_at(AT_FDCWD, paths[i], &h.fh, &mount_id, 0) == 0)
            got = paths[i];
    }
    char step[128];
    int mfd = open(got ? got : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (!got) {
        /* No filesystem here exports handles: a zeroed handle still reaches the syscall. */
        memset(&h, 0, sizeof h);
        h.fh.handle_bytes = 8;
    }
    snprintf(step, sizeof step, "name_to_handle_at(%s):%s,open_by_handle_at", got ? got : "/",
             got ? "ok" : "unsupported");
    int fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        blocked(n, errno, step);
    } else {
        close(fd);
        allowed(n, "open_by_handle_at-opened-an-inode-by-handle");
    }
    if (mfd >= 0)
        close(mfd);
}

static void try_mknod(const char *n, mode_t type, unsigned maj, unsigned min) {
    char path[64], step[64];
    mkdir(SCRATCH, 0700);
    snprintf(path, sizeof path, SCRATCH "/node-%u-%u", maj, min);
    snprintf(step, sizeof step, "mknod-%c-%u:%u", type == S_IFBLK ? 'b' : 'c', maj, min);
    if (mknod(path, type | 0600, makedev(maj, min)) != 0) {
        blocked(n, errno, step);
        return;
    }
    /* The node itself is the finding; it is never opened. */
    unlink(path);
    allowed(n, step);
}

static void p_mknod_block(const char *n) { try_mknod(n, S_IFBLK, 8, 0); }
static void p_mknod_mem(const char *n) { try_mknod(n, S_IFCHR, 1, 1); }

static void nullcall(const char *n, const char *step, long r) {
    if (r == -1)
        blocked(n, errno, step);
    else
        allowed(n, step);
}

static void p_init_module(const char *n) { nullcall(n, "init_module(NULL,0,\"\")", syscall(SYS_init_module, NULL, 0, "")); }
static void p_finit_module(const char *n) { nullcall(n, "finit_module(-1,\"\",0)", syscall(SYS_finit_module, -1, "", 0)); }
static void p_kexec_load(const char *n) { nullcall(n, "kexec_load(0,0,NULL,0)", syscall(SYS_kexec_load, 0, 0, NULL, 0)); }
static void p_kexec_file_load(const char *n) { nullcall(n, "kexec_file_load(-1,-1,0,\"\",0)", syscall(SYS_kexec_file_load, -1, -1, 0, "", 0)); }

static void p_ptrace_host(const char *n) {
    char step[64];
    snprintf(step, sizeof step, "PTRACE_ATTACH(%d)", host_pid);
    if (ptrace(PTRACE_ATTACH, host_pid, 0, 0) != 0) {
        blocked(n, errno, step);
        return;
    }
    ptrace(PTRACE_DETACH, host_pid, 0, 0);
    allowed(n, step);
}

static void p_kill_host(const char *n) {
    char step[64];
    snprintf(step, sizeof step, "kill(%d,0)", host_pid);
    nullcall(n, step, kill(host_pid, 0));
}

static void p_setns_host(const char *n) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/net", host_pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        char step[80];
        snprintf(step, sizeof step, "open:%s", path);
        blocked(n, errno, step);
        return;
    }
    /* Never joined: holding the fd already is the escape. */
    close(fd);
    allowed(n, "host-netns-fd-opened");
}

static const struct {
    const char *name;
    void (*run)(const char *);
} probes[] = {
    {"procfs-core-pattern", p_procfs_core_pattern},
    {"procfs-modprobe", p_procfs_modprobe},
    {"procfs-drop-caches", p_procfs_drop_caches},
    {"procfs-sysctls", p_procfs_sys_walk},
    {"procfs-sysrq-trigger", p_procfs_sysrq},
    {"proc-core-pattern", p_proc_core_pattern},
    {"proc-sysctls", p_proc_sys_walk},
    {"proc-sysrq-trigger", p_proc_sysrq},
    {"sysfs-remount-rw", p_sysfs_remount_rw},
    {"sysfs-fresh-rw", p_sysfs_fresh_rw},
    {"debugfs-mount", p_debugfs},
    {"bpf-map-by-id", p_bpf_map},
    {"bpf-prog-by-id", p_bpf_prog},
    {"bpf-link-by-id", p_bpf_link},
    {"bpffs-mount", p_bpffs},
    {"cgroup1-release-agent", p_cgroup1_release_agent},
    {"cgroup1-memory-release-agent", p_cgroup1_memory_release_agent},
    {"cgroup-memory-limit", p_cg_memory},
    {"cgroup-pids-limit", p_cg_pids},
    {"cgroup-cpu-limit", p_cg_cpu},
    {"cgroup-devices-allow", p_cg_devices},
    {"cgroup2-limits", p_cg2},
    {"cgroup-mounted-limits", p_cg_mounted},
    {"open-by-handle", p_open_by_handle},
    {"mknod-block", p_mknod_block},
    {"mknod-dev-mem", p_mknod_mem},
    {"init-module", p_init_module},
    {"finit-module", p_finit_module},
    {"kexec-load", p_kexec_load},
    {"kexec-file-load", p_kexec_file_load},
    {"ptrace-host-pid", p_ptrace_host},
    {"kill-host-pid", p_kill_host},
    {"setns-host-netns", p_setns_host},
};

#define NPROBES (sizeof probes / sizeof probes[0])

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || (host_pid = atoi(argv[1])) <= 1) {
        fprintf(stderr, "usage: %s <host pid> [probe...]\n", argv[0]);
        return 2;
    }
    /* Some probes remount /sys and mount over scratch dirs: harmless in a CT's own mount
     * namespace, not on the host. Seeing the host pid means this is not a CT. */
    if (kill(host_pid, 0) == 0 || errno != ESRCH) {
        fprintf(stderr, "%s: pid %d is visible: not inside a CT, refusing to probe\n", argv[0],
                host_pid);
        return 3;
    }
    if (argc == 2) {
        for (unsigned i = 0; i < NPROBES; i++)
            probes[i].run(probes[i].name);
    } else {
        for (int a = 2; a < argc; a++) {
            unsigned i = 0;
            while (i < NPROBES && strcmp(probes[i].name, argv[a]) != 0)
                i++;
            if (i == NPROBES)
                printf("%s UNKNOWN - no-such-probe\n", argv[a]);
            else
                probes[i].run(probes[i].name);
        }
    }
    rmdir(SCRATCH);
    return 0;
}
