/* Lab helper: inject code into a running process with ptrace.
 * Makes the target call mmap(RWX, anonymous), writes a small payload there, runs it (it writes a
 * marker to the target's memory and traps), then restores the target's registers and detaches.
 * The target keeps running; the anonymous executable mapping with the payload stays behind. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>

/* payload: lea rsi,[rip+marker]; inc qword [rsi+24]; int3; then the marker text */
static const unsigned char payload[] = {
    0x48, 0x8d, 0x35, 0x09, 0x00, 0x00, 0x00, /* lea rsi, [rip+9] = marker */
    0x48, 0xff, 0x46, 0x18,                   /* inc qword [rsi+0x18] */
    0xcc,                                     /* int3 */
    0x90, 0x90, 0x90, 0x90,                   /* pad to 16 */
    'N', 'E', 'P', 'H', 'O', 'S', 'C', 'O', 'P', 'E', '-', 'I', 'N', 'J', 'E', 'C',
    'T', 'E', 'D', '-', 'C', 'O', 'D', 'E', 0, 0, 0, 0, 0, 0, 0, 0,
};

static void die(const char *what) { perror(what); exit(1); }

static void poke(pid_t pid, uint64_t addr, const unsigned char *buf, size_t len) {
    for (size_t off = 0; off < len; off += 8) {
        uint64_t word = 0;
        size_t n = len - off < 8 ? len - off : 8;
        if (n < 8) {
            errno = 0;
            word = (uint64_t)ptrace(PTRACE_PEEKDATA, pid, (void *)(addr + off), 0);
            if (errno) die("peek");
        }
        memcpy(&word, buf + off, n);
        if (ptrace(PTRACE_POKEDATA, pid, (void *)(addr + off), (void *)word) < 0) die("poke");
    }
}

static void wait_stop(pid_t pid) {
    int status;
    if (waitpid(pid, &status, 0) < 0) die("waitpid");
    if (!WIFSTOPPED(status)) { fprintf(stderr, "target did not stop\n"); exit(1); }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s PID\n", argv[0]); return 2; }
    pid_t pid = (pid_t)atoi(argv[1]);
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) < 0) die("attach");
    wait_stop(pid);

    struct user_regs_struct saved, regs;
    if (ptrace(PTRACE_GETREGS, pid, 0, &saved) < 0) die("getregs");
    errno = 0;
    uint64_t orig_word = (uint64_t)ptrace(PTRACE_PEEKTEXT, pid, (void *)saved.rip, 0);
    if (errno) die("peektext");

    /* 1. run mmap(NULL, 4096, RWX, PRIVATE|ANON) through a syscall instruction placed at rip */
    unsigned char sc[8];
    memcpy(sc, &orig_word, 8);
    sc[0] = 0x0f; sc[1] = 0x05;
    poke(pid, saved.rip, sc, 8);
    regs = saved;
    regs.orig_rax = (uint64_t)-1; /* no syscall restart */
    regs.rax = 9; regs.rdi = 0; regs.rsi = 4096; regs.rdx = PROT_READ | PROT_WRITE | PROT_EXEC;
    regs.r10 = MAP_PRIVATE | MAP_ANONYMOUS; regs.r8 = (uint64_t)-1; regs.r9 = 0;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0) die("setregs");
    if (ptrace(PTRACE_SINGLESTEP, pid, 0, 0) < 0) die("singlestep");
    wait_stop(pid);
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0) die("getregs");
    uint64_t area = regs.rax;
    poke(pid, saved.rip, (unsigned char *)&orig_word, 8);
    if ((int64_t)area < 0 && (int64_t)area > -4096) { fprintf(stderr, "remote mmap failed\n"); return 1; }

    /* 2. write the payload and run it until its int3 */
    poke(pid, area, payload, sizeof payload);
    regs = saved;
    regs.orig_rax = (uint64_t)-1;
    regs.rip = area;
    regs.rsp = (saved.rsp - 256) & ~0xfULL; /* stay clear of the red zone */
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0) die("setregs");
    if (ptrace(PTRACE_CONT, pid, 0, 0) < 0) die("cont");
    wait_stop(pid);

    /* 3. restore and leave */
    if (ptrace(PTRACE_SETREGS, pid, 0, &saved) < 0) die("setregs");
    if (ptrace(PTRACE_DETACH, pid, 0, 0) < 0) die("detach");
    printf("injected %zu bytes at 0x%llx in pid %d\n", sizeof payload, (unsigned long long)area, pid);
    return 0;
}
