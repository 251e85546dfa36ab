// SPDX-License-Identifier: GPL-2.0
/*
 * nph_own: a harmless module that no Debian kernel package ships. Loaded into a clean lab guest it must be
 * reported as unknown kernel code (its text matches no image of the KB's kernel package), never as
 * verified and never as a crash. It only keeps a counter a timer-free function bumps.
 */
#include <linux/module.h>
#include <linux/init.h>

static unsigned long nph_own_calls;

noinline unsigned long nph_own_touch(unsigned long n)
{
	nph_own_calls += n;
	return nph_own_calls * 3 + 1;
}

static int __init nph_own_init(void)
{
	pr_info("nph_own: loaded, %lu\n", nph_own_touch(1));
	return 0;
}

static void __exit nph_own_exit(void)
{
	pr_info("nph_own: unloaded\n");
}

module_init(nph_own_init);
module_exit(nph_own_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nephoscope test: a benign module not in the kernel package");
