// SPDX-License-Identifier: GPL-2.0
/*
 * nph_unhook: a test subject that blinds nephoscope's in-guest driver (nphdrv) the way a rootkit would.
 *
 * It removes nphdrv's probes from the sched_process_exec and sched_process_exit tracepoints and leaves
 * nphdrv loaded, so /proc/nephoscope still answers, its counters still say the hooks are in place, and
 * from then on no exec or exit is recorded. The probe addresses come from nphdrv's own symbols
 * ("nphdrv:probe_exec"), through kallsyms_lookup_name, itself found with a kprobe (it is not exported).
 * The driver method's canary exec (docs/driver.md) must then turn its events into `unverifiable`.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/tracepoint.h>
#include <linux/string.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nephoscope test subject: unhooks nphdrv's tracepoint probes");

typedef unsigned long (*lookup_t)(const char *name);

static struct tracepoint *tp_exec, *tp_exit;

static void find_tp(struct tracepoint *tp, void *priv)
{
	if (!strcmp(tp->name, "sched_process_exec"))
		tp_exec = tp;
	else if (!strcmp(tp->name, "sched_process_exit"))
		tp_exit = tp;
}

static int __init nph_unhook_init(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long exec_fn, exit_fn;
	lookup_t lookup;
	int ret = register_kprobe(&kp);

	if (ret)
		return ret;
	lookup = (lookup_t)kp.addr;
	unregister_kprobe(&kp);
	if (!lookup)
		return -ENOENT;
	exec_fn = lookup("nphdrv:probe_exec");
	exit_fn = lookup("nphdrv:probe_exit");
	for_each_kernel_tracepoint(find_tp, NULL);
	if (!exec_fn || !exit_fn || !tp_exec || !tp_exit)
		return -ENOENT;
	ret = tracepoint_probe_unregister(tp_exec, (void *)exec_fn, NULL);
	if (!ret)
		ret = tracepoint_probe_unregister(tp_exit, (void *)exit_fn, NULL);
	pr_info("nph_unhook: nphdrv's probes at %lx %lx removed (%d)\n", exec_fn, exit_fn, ret);
	return ret;
}

module_init(nph_unhook_init);
