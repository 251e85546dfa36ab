/*
 * nephoscope archevents: a QEMU TCG plugin (QEMU 7.2 plugin API, version 1) that reports, over a Unix
 * socket, the first execution of every guest-physical code page and every execution of a page after it
 * was written (self-modifying or injected code, or a page reused for other code).
 *
 * Plugin arguments: sock=PATH (listening Unix socket, required), ram=TEXT (a substring of the path of
 * the guest-RAM mapping in /proc/self/maps: the memory-backend-file path or "memfd:ram0", required),
 * writes=on|off (track stores to executed pages; default on), bytes=on|off (send each page's 4 KiB as
 * it was when it was translated; default on).
 *
 * "Executed" means translated by TCG: QEMU translates a block just before it first executes it, and
 * again after a store to its bytes invalidated it. A per-page state byte keeps it cheap: 0 never
 * executed, 1 executed, 2 executed and written since. Store callbacks only move 1 -> 2; a translation
 * on a page in state 0 or 2 emits an event and moves it to 1. Device DMA does not pass through store
 * callbacks (documented in docs/arch-events.md). The plugin API of 7.2 exposes no CPU registers, so
 * no cr3: the reader attributes a page to address spaces through the page tables.
 *
 * Wire format (little-endian): a 40-byte header {u32 magic "NPAE", u8 kind, u8 flags, u16 reserved,
 * u32 length, u32 reserved, u64 gpa, u64 vaddr, u64 time_ns} followed by `length` payload bytes.
 * Kinds: 1 first execution, 2 execution after a write, 3 replay (a page executed before this reader
 * connected; flag bit 1 when written since), 4 hello (text), 5 stats (8 x u64), 6 replay done. One reader at a time: a new connection
 * replaces the old one. The reader may send 's' to ask for a stats record.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAGIC 0x4541504eu
#define PAGE_SHIFT 12
#define PAGE_SIZE 4096u
enum { EV_FIRST = 1, EV_WRITTEN = 2, EV_REPLAY = 3, EV_HELLO = 4, EV_STATS = 5, EV_REPLAY_DONE = 6 };
enum { ST_NEVER = 0, ST_EXEC = 1, ST_WRITTEN = 2 };

struct record {
    uint32_t magic;
    uint8_t kind;
    uint8_t flags; /* bit 0: the payload is the page's bytes; bit 1 (replay): written since it ran */
    uint16_t reserved0;
    uint32_t length;
    uint32_t reserved1;
    uint64_t gpa;
    uint64_t vaddr;
    uint64_t time_ns;
} __attribute__((packed));

static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char ram_match[512];
static bool track_writes = true, send_bytes = true;
static int listen_fd = -1, client_fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t acceptor;

static uint8_t *ram_host;          /* host address of the RAM mapping */
static uint64_t ram_size, ram_file_offset, n_pages;
static bool ram_searched;
static uint8_t *state;             /* per guest-physical page */
static uint64_t *page_vaddr;       /* vaddr of the instruction that first executed it (for replay) */

/* statistics (under lock, or relaxed atomics for the store path) */
static uint64_t n_first, n_written, n_replayed, n_sent, n_send_failed, n_outside, n_unsent, n_store_marks;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void find_ram(void)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[1024];
    uint64_t best = 0;
    ram_searched = true;
    if (!maps) {
        return;
    }
    while (fgets(line, sizeof line, maps)) {
        unsigned long long start, end, offset;
        char path[600] = "";
        if (sscanf(line, "%llx-%llx %*s %llx %*s %*s %599[^\n]", &start, &end, &offset, path) < 3) {
            continue;
        }
        if (!strstr(path, ram_match) || end - start <= best) {
            continue;
        }
        best = end - start;
        ram_host = (uint8_t *)(uintptr_t)start;
        ram_size = end - start;
        ram_file_offset = offset;
    }
    fclose(maps);
    if (!ram_host) {
        char msg[700];
        snprintf(msg, sizeof msg, "archevents: no mapping matches ram=%s; no events\n", ram_match);
        qemu_plugin_outs(msg);
        return;
    }
    n_pages = (ram_file_offset + ram_size) >> PAGE_SHIFT;
    state = calloc(n_pages, 1);
    page_vaddr = calloc(n_pages, sizeof *page_vaddr);
    if (!state || !page_vaddr) {
        free(state);
        free(page_vaddr);
        state = NULL;
        page_vaddr = NULL;
        ram_host = NULL;
        n_pages = 0;
        qemu_plugin_outs("archevents: out of memory for the page state; no events\n");
    }
}

static void drop_client(void)
{
    if (client_fd >= 0) {
        close(client_fd);
        client_fd = -1;
    }
}

/* Send one record to the reader (lock held). A reader that does not take it within the send timeout
 * is dropped, so a stalled reader slows the guest by at most that timeout, once. */
static void send_record(uint8_t kind, uint64_t gpa, uint64_t vaddr, const void *payload, uint32_t length,
                        uint8_t flags)
{
    struct record rec = { MAGIC, kind, flags, 0, length, 0, gpa, vaddr, now_ns() };
    struct iovec iov[2] = { { &rec, sizeof rec }, { (void *)payload, length } };
    size_t want = sizeof rec + length, done = 0;
    if (client_fd < 0) {
        n_unsent++;
        return;
    }
    while (done < want) {
        struct msghdr msg = { 0 };
        struct iovec part[2];
        int n = 0;
        size_t skip = done;
        for (int i = 0; i < 2; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            part[n].iov_base = (uint8_t *)iov[i].iov_base + skip;
            part[n].iov_len = iov[i].iov_len - skip;
            skip = 0;
            n++;
        }
        msg.msg_iov = part;
        msg.msg_iovlen = n;
        ssize_t sent = sendmsg(client_fd, &msg, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) {
            continue;
        }
        if (sent <= 0) {
            n_send_failed++;
            drop_client();
            return;
        }
        done += (size_t)sent;
    }
    n_sent++;
}

static void send_page(uint8_t kind, uint64_t page, uint64_t vaddr, uint8_t flags)
{
    const uint8_t *host = ram_host + (page << PAGE_SHIFT) - ram_file_offset;
    send_record(kind, page << PAGE_SHIFT, vaddr, send_bytes ? host : NULL, send_bytes ? PAGE_SIZE : 0,
                flags | (send_bytes ? 1 : 0));
}

static void send_stats(void)
{
    uint64_t s[8] = { n_first, n_written, n_replayed, n_sent, n_send_failed, n_outside, n_unsent,
                      __atomic_load_n(&n_store_marks, __ATOMIC_RELAXED) };
    send_record(EV_STATS, 0, 0, s, sizeof s, 0);
}

static void check_insn(struct qemu_plugin_insn *insn)
{
    const uint8_t *haddr = qemu_plugin_insn_haddr(insn);
    uint64_t vaddr = qemu_plugin_insn_vaddr(insn);
    if (!ram_host || !haddr || haddr < ram_host || haddr >= ram_host + ram_size) {
        __atomic_add_fetch(&n_outside, 1, __ATOMIC_RELAXED); /* ROM, MMIO or before RAM was found */
        return;
    }
    uint64_t page = ((uint64_t)(haddr - ram_host) + ram_file_offset) >> PAGE_SHIFT;
    if (__atomic_load_n(&state[page], __ATOMIC_RELAXED) == ST_EXEC) {
        return; /* the common case: no lock */
    }
    pthread_mutex_lock(&lock);
    uint8_t s = state[page];
    if (s != ST_EXEC) {
        __atomic_store_n(&state[page], ST_EXEC, __ATOMIC_RELAXED);
        page_vaddr[page] = vaddr;
        if (s == ST_WRITTEN) {
            n_written++;
        } else {
            n_first++;
        }
        send_page(s == ST_WRITTEN ? EV_WRITTEN : EV_FIRST, page, vaddr, 0);
    }
    pthread_mutex_unlock(&lock);
}

static void on_store(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    (void)vcpu;
    (void)udata;
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw) || !state) {
        return;
    }
    uint64_t pa = qemu_plugin_hwaddr_phys_addr(hw);
    uint64_t last = pa + (1u << qemu_plugin_mem_size_shift(info)) - 1;
    for (uint64_t page = pa >> PAGE_SHIFT; page <= (last >> PAGE_SHIFT); page++) {
        if (page < n_pages && __atomic_load_n(&state[page], __ATOMIC_RELAXED) == ST_EXEC) {
            __atomic_store_n(&state[page], ST_WRITTEN, __ATOMIC_RELAXED);
            __atomic_add_fetch(&n_store_marks, 1, __ATOMIC_RELAXED);
        }
    }
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (n == 0) {
        return;
    }
    if (!ram_searched) {
        pthread_mutex_lock(&lock);
        if (!ram_searched) {
            find_ram();
        }
        pthread_mutex_unlock(&lock);
    }
    struct qemu_plugin_insn *first = qemu_plugin_tb_get_insn(tb, 0);
    struct qemu_plugin_insn *last = qemu_plugin_tb_get_insn(tb, n - 1);
    check_insn(first);
    if ((qemu_plugin_insn_vaddr(first) >> PAGE_SHIFT) !=
        ((qemu_plugin_insn_vaddr(last) + qemu_plugin_insn_size(last) - 1) >> PAGE_SHIFT)) {
        check_insn(last); /* a block that crosses into the next page */
    }
    if (track_writes) {
        for (size_t i = 0; i < n; i++) {
            qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), on_store, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_W, NULL);
        }
    }
}

static void greet(void)
{
    char hello[256];
    int len = snprintf(hello, sizeof hello, "archevents 1 ram_size=%" PRIu64 " ram_offset=%" PRIu64
                       " pages=%" PRIu64 " writes=%d bytes=%d\n", ram_size, ram_file_offset, n_pages,
                       track_writes, send_bytes);
    send_record(EV_HELLO, 0, 0, hello, (uint32_t)len, 0);
    for (uint64_t page = 0; page < n_pages && client_fd >= 0; page++) {
        if (state[page] != ST_NEVER) { /* flag 2: written since it ran, the bytes may not be that code */
            n_replayed++;
            send_page(EV_REPLAY, page, page_vaddr[page], state[page] == ST_WRITTEN ? 2 : 0);
        }
    }
    send_record(EV_REPLAY_DONE, 0, 0, NULL, 0, 0);
}

static void *accept_loop(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd fds[2] = { { listen_fd, POLLIN, 0 }, { -1, POLLIN, 0 } };
        pthread_mutex_lock(&lock);
        fds[1].fd = client_fd;
        pthread_mutex_unlock(&lock);
        if (poll(fds, fds[1].fd >= 0 ? 2 : 1, 1000) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return NULL;
        }
        if (fds[0].revents & POLLIN) {
            int fd = accept(listen_fd, NULL, NULL);
            if (fd >= 0) {
                struct timeval tv = { 5, 0 };
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
                pthread_mutex_lock(&lock);
                drop_client(); /* the newest reader wins */
                client_fd = fd;
                if (!ram_searched) {
                    find_ram();
                }
                greet();
                pthread_mutex_unlock(&lock);
            }
            continue;
        }
        if (fds[1].fd >= 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            char buf[64];
            ssize_t got = recv(fds[1].fd, buf, sizeof buf, MSG_DONTWAIT);
            pthread_mutex_lock(&lock);
            if (client_fd == fds[1].fd) {
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                    drop_client();
                } else if (got > 0 && memchr(buf, 's', (size_t)got)) {
                    send_stats();
                }
            }
            pthread_mutex_unlock(&lock);
        }
    }
}

static bool parse_bool(const char *name, const char *value, bool *out)
{
    return qemu_plugin_bool_parse(name, value, out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    if (info->system_emulation == false) {
        fprintf(stderr, "archevents: system emulation only\n");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "archevents: argument %s is not KEY=VALUE\n", argv[i]);
            return -1;
        }
        *eq = '\0';
        const char *key = argv[i], *value = eq + 1;
        if (strcmp(key, "sock") == 0 && strlen(value) < sizeof sock_path) {
            strcpy(sock_path, value);
        } else if (strcmp(key, "ram") == 0 && strlen(value) < sizeof ram_match) {
            strcpy(ram_match, value);
        } else if (strcmp(key, "writes") == 0 && parse_bool(key, value, &track_writes)) {
        } else if (strcmp(key, "bytes") == 0 && parse_bool(key, value, &send_bytes)) {
        } else {
            fprintf(stderr, "archevents: bad argument %s=%s\n", key, value);
            return -1;
        }
    }
    if (!sock_path[0] || !ram_match[0]) {
        fprintf(stderr, "archevents: sock=PATH and ram=MAPPING are required\n");
        return -1;
    }
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strcpy(addr.sun_path, sock_path);
    unlink(sock_path);
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listen_fd, 2) < 0) {
        fprintf(stderr, "archevents: cannot listen on %s: %s\n", sock_path, strerror(errno));
        return -1;
    }
    if (pthread_create(&acceptor, NULL, accept_loop, NULL) != 0) {
        fprintf(stderr, "archevents: cannot start the socket thread\n");
        return -1;
    }
    pthread_detach(acceptor);
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    return 0;
}
