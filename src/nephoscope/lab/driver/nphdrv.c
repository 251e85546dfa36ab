// SPDX-License-Identifier: GPL-2.0
/*
 * nphdrv: the kernel component of nephoscope's `driver` method (the host agent with an in-guest driver).
 *
 * Records process exec and exit (the sched_process_exec / sched_process_exit tracepoints) and module
 * loads (the module notifier, MODULE_STATE_COMING) in a fixed ring buffer, each with a ktime stamp and
 * the time the probe itself took, and exposes through procfs, read by the guest agent:
 *   /proc/nephoscope/tasks   the process table (for_each_process under RCU): pid ppid uid kind start comm exe
 *   /proc/nephoscope/events  the ring, oldest first
 *   /proc/nephoscope/stats   counters: events per kind, kernel ns spent per kind (total, max), drops
 * Text is line based; every string field is "=" followed by its bytes with anything outside 0x21..0x7e
 * and '\' written as \xHH, so a comm or path cannot break a line. Each file ends with "end <count>".
 *
 * The sched tracepoints are not exported to modules (no EXPORT_TRACEPOINT_SYMBOL for them on Debian's
 * 6.1 / 6.12): the struct tracepoint is found by name with for_each_kernel_tracepoint() (exported) and
 * probed with tracepoint_probe_register(). The exit tracepoint's prototype is (task) on 6.1 and 6.12
 * (6.16 adds a group_dead argument; the probe only reads the task, which stays the first argument).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/tracepoint.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/mm.h>
#include <linux/mm.h>
#include <linux/sched/task.h>
#include <linux/binfmts.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/spinlock.h>
#include <linux/ktime.h>
#include <linux/slab.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/dcache.h>
#include <linux/cred.h>
#include <linux/string.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nephoscope driver: exec/exit/module-load events and the process table via /proc/nephoscope");

#define NPH_RING 2048
#define NPH_FILE 96
#define NPH_TASKS 32768

enum { EV_EXEC, EV_EXIT, EV_MODULE, EV_KINDS };
static const char *const kind_name[EV_KINDS] = { "exec", "exit", "module" };

struct nph_event {
	u64 seq;
	u64 ns;
	u32 kind;
	pid_t pid, tgid, ppid;
	int code;
	char comm[TASK_COMM_LEN];
	char file[NPH_FILE];
};

static struct nph_event ring[NPH_RING];
static u64 next_seq;             /* sequence number of the next event (== events recorded) */
static u64 count[EV_KINDS], cost_ns[EV_KINDS], cost_max[EV_KINDS];
static u64 loaded_ns;
static DEFINE_SPINLOCK(ring_lock);

static struct tracepoint *tp_exec, *tp_exit;
static struct proc_dir_entry *dir;

static void record(u32 kind, struct task_struct *p, int code, const char *file, u64 started)
{
	unsigned long flags;
	struct nph_event *e;
	u64 spent;

	spin_lock_irqsave(&ring_lock, flags);
	e = &ring[next_seq % NPH_RING];
	e->seq = next_seq++;
	e->ns = started;
	e->kind = kind;
	e->pid = p ? p->pid : 0;
	e->tgid = p ? p->tgid : 0;
	e->ppid = p ? task_tgid_nr(rcu_dereference_raw(p->real_parent)) : 0;
	e->code = code;
	if (p)
		memcpy(e->comm, p->comm, TASK_COMM_LEN);
	else
		e->comm[0] = 0;
	e->comm[TASK_COMM_LEN - 1] = 0;
	strscpy(e->file, file ? file : "", NPH_FILE);
	spent = ktime_get_ns() - started;  /* the probe's own cost, ring update included */
	count[kind]++;
	cost_ns[kind] += spent;
	if (spent > cost_max[kind])
		cost_max[kind] = spent;
	spin_unlock_irqrestore(&ring_lock, flags);
}

static void probe_exec(void *data, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	record(EV_EXEC, p, 0, bprm ? bprm->filename : "", ktime_get_ns());
}

static void probe_exit(void *data, struct task_struct *p)
{
	u64 now = ktime_get_ns();

	if (!thread_group_leader(p))  /* one exit per process, not per thread */
		return;
	record(EV_EXIT, p, p->exit_code, "", now);
}

static int on_module(struct notifier_block *nb, unsigned long state, void *data)
{
	struct module *mod = data;
	u64 now = ktime_get_ns();

	if (state == MODULE_STATE_COMING)
		record(EV_MODULE, current, 0, mod->name, now);
	return NOTIFY_DONE;
}

static struct notifier_block module_nb = { .notifier_call = on_module };

static void find_tp(struct tracepoint *tp, void *priv)
{
	if (!strcmp(tp->name, "sched_process_exec"))
		tp_exec = tp;
	else if (!strcmp(tp->name, "sched_process_exit"))
		tp_exit = tp;
}

static void put_str(struct seq_file *m, const char *s, size_t max)
{
	size_t i;

	seq_putc(m, '=');
	for (i = 0; i < max && s[i]; i++) {
		unsigned char c = s[i];

		if (c <= 0x20 || c >= 0x7f || c == '\\')
			seq_printf(m, "\\x%02x", c);
		else
			seq_putc(m, c);
	}
}

static int stats_show(struct seq_file *m, void *v)
{
	unsigned long flags;
	u64 c[EV_KINDS], t[EV_KINDS], x[EV_KINDS], seq;
	int k;

	spin_lock_irqsave(&ring_lock, flags);
	memcpy(c, count, sizeof(c));
	memcpy(t, cost_ns, sizeof(t));
	memcpy(x, cost_max, sizeof(x));
	seq = next_seq;
	spin_unlock_irqrestore(&ring_lock, flags);
	seq_printf(m, "nphdrv-stats 1\nloaded_ns %llu\nnow_ns %llu\nevents %llu\ncapacity %d\ndropped %llu\n",
		   loaded_ns, ktime_get_ns(), seq, NPH_RING, seq > NPH_RING ? seq - NPH_RING : 0);
	seq_printf(m, "now_boot_ns %llu\n", ktime_get_boottime_ns());
	seq_printf(m, "hooks exec=%d exit=%d module=1\n", tp_exec != NULL, tp_exit != NULL);
	for (k = 0; k < EV_KINDS; k++)
		seq_printf(m, "cost %s %llu %llu %llu\n", kind_name[k], c[k], t[k], x[k]);
	seq_printf(m, "end %d\n", 7 + EV_KINDS);
	return 0;
}

static int events_show(struct seq_file *m, void *v)
{
	unsigned long flags;
	u64 first, last, s;
	struct nph_event e;
	unsigned int n = 0;

	spin_lock_irqsave(&ring_lock, flags);
	last = next_seq;
	spin_unlock_irqrestore(&ring_lock, flags);
	first = last > NPH_RING ? last - NPH_RING : 0;
	seq_printf(m, "nphdrv-events 1 %llu %llu\n", first, last);
	for (s = first; s < last; s++) {
		spin_lock_irqsave(&ring_lock, flags);
		e = ring[s % NPH_RING];
		spin_unlock_irqrestore(&ring_lock, flags);
		if (e.seq != s)  /* overwritten while we read: the reader sees a gap in seq */
			continue;
		seq_printf(m, "E %llu %llu %s %d %d %d %d ", e.seq, e.ns, kind_name[e.kind], e.pid, e.tgid, e.ppid, e.code);
		put_str(m, e.comm, TASK_COMM_LEN);
		seq_putc(m, ' ');
		put_str(m, e.file, NPH_FILE);
		seq_putc(m, '\n');
		n++;
	}
	seq_printf(m, "end %u\n", n);
	return 0;
}

static int tasks_show(struct seq_file *m, void *v)
{
	struct task_struct *p, **tasks;
	unsigned int n = 0, i;
	bool truncated = false;
	char *buf;

	/* two passes: take a reference on every process under RCU, then read each one's exe outside it
	 * (get_task_mm takes task_lock and mmput may sleep; get_task_exe_file is not exported) */
	tasks = kvmalloc_array(NPH_TASKS, sizeof(*tasks), GFP_KERNEL);
	buf = kmalloc(PATH_MAX, GFP_KERNEL);
	if (!tasks || !buf) {
		kvfree(tasks);
		kfree(buf);
		return -ENOMEM;
	}
	rcu_read_lock();
	for_each_process(p) {
		if (n == NPH_TASKS) {
			truncated = true;
			break;
		}
		get_task_struct(p);
		tasks[n++] = p;
	}
	rcu_read_unlock();
	seq_puts(m, "nphdrv-tasks 1\n");
	for (i = 0; i < n; i++) {
		struct mm_struct *mm;
		const char *path = "";
		pid_t ppid;

		p = tasks[i];
		mm = (p->flags & PF_KTHREAD) ? NULL : get_task_mm(p);
		if (mm) {
			struct file *exe;

			rcu_read_lock();
			exe = rcu_dereference(mm->exe_file);
			if (exe) {
				path = d_path(&exe->f_path, buf, PATH_MAX);
				if (IS_ERR(path))
					path = "";
			}
			rcu_read_unlock();
		}
		rcu_read_lock();
		ppid = task_tgid_nr(rcu_dereference(p->real_parent));
		rcu_read_unlock();
		seq_printf(m, "T %d %d %u %c %llu ", p->pid, ppid,
			   from_kuid_munged(&init_user_ns, task_uid(p)), p->flags & PF_KTHREAD ? 'k' : 'u',
			   p->start_boottime);
		put_str(m, p->comm, TASK_COMM_LEN);
		seq_putc(m, ' ');
		put_str(m, path, PATH_MAX);
		seq_putc(m, '\n');
		if (mm)
			mmput(mm);
		put_task_struct(p);
	}
	kvfree(tasks);
	kfree(buf);
	seq_printf(m, "end %u%s\n", n, truncated ? " truncated" : "");
	return 0;
}

static void cleanup(void)
{
	if (dir)
		proc_remove(dir);
	if (tp_exec)
		tracepoint_probe_unregister(tp_exec, probe_exec, NULL);
	if (tp_exit)
		tracepoint_probe_unregister(tp_exit, probe_exit, NULL);
	tracepoint_synchronize_unregister();
}

static int __init nphdrv_init(void)
{
	int ret;

	loaded_ns = ktime_get_ns();
	for_each_kernel_tracepoint(find_tp, NULL);
	if (!tp_exec || !tp_exit) {
		pr_err("nphdrv: sched_process_exec/exit tracepoints not found\n");
		return -ENOENT;
	}
	ret = tracepoint_probe_register(tp_exec, probe_exec, NULL);
	if (ret) {
		tp_exec = tp_exit = NULL;
		return ret;
	}
	ret = tracepoint_probe_register(tp_exit, probe_exit, NULL);
	if (ret) {
		tp_exit = NULL;
		cleanup();
		return ret;
	}
	dir = proc_mkdir("nephoscope", NULL);
	if (!dir || !proc_create_single("tasks", 0400, dir, tasks_show) ||
	    !proc_create_single("events", 0400, dir, events_show) ||
	    !proc_create_single("stats", 0444, dir, stats_show)) {
		cleanup();
		return -ENOMEM;
	}
	ret = register_module_notifier(&module_nb);
	if (ret) {
		cleanup();
		return ret;
	}
	pr_info("nphdrv: recording exec/exit/module-load, /proc/nephoscope ready\n");
	return 0;
}

static void __exit nphdrv_exit(void)
{
	unregister_module_notifier(&module_nb);
	cleanup();
}

module_init(nphdrv_init);
module_exit(nphdrv_exit);
