/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * histograms.h - observations in the duration histograms (COLLECT_METRICS).
 *
 * Each histogram is a flat per-CPU array named after its metric (maps.h):
 * for each label row, NB_<NAME> buckets (le = bound), one +Inf bucket and
 * the sum in nanoseconds (HIST_ROW). Its bounds and bucket_<name>() come
 * from tcptrace_ebpf/kernel/buckets.py, in the preamble.
 */

#if COLLECT_METRICS
/*
 * One observation in a histogram: a count in its bucket, ns added to its sum.
 * (BCC can neither take a map's address nor call map methods from a macro,
 * hence one small function per histogram.)
 */
static __always_inline void observe_state_duration(u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(NB_STATE);
	u32 index = base + bucket_state(ns);
	u64 *value = state_duration_seconds.lookup(&index);
	if (value)
		*value += 1;
	index = base + NB_STATE + 1;
	value = state_duration_seconds.lookup(&index);
	if (value)
		*value += ns;
}

static __always_inline void observe_handshake(u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(NB_HANDSHAKE);
	u32 index = base + bucket_handshake(ns);
	u64 *value = handshake_duration_seconds.lookup(&index);
	if (value)
		*value += 1;
	index = base + NB_HANDSHAKE + 1;
	value = handshake_duration_seconds.lookup(&index);
	if (value)
		*value += ns;
}

static __always_inline void observe_connection(u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(NB_CONNECTION);
	u32 index = base + bucket_connection(ns);
	u64 *value = connection_duration_seconds.lookup(&index);
	if (value)
		*value += 1;
	index = base + NB_CONNECTION + 1;
	value = connection_duration_seconds.lookup(&index);
	if (value)
		*value += ns;
}

static __always_inline void observe_time_wait(u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(NB_TIME_WAIT);
	u32 index = base + bucket_time_wait(ns);
	u64 *value = time_wait_duration_seconds.lookup(&index);
	if (value)
		*value += 1;
	index = base + NB_TIME_WAIT + 1;
	value = time_wait_duration_seconds.lookup(&index);
	if (value)
		*value += ns;
}

static __always_inline void observe_close_wait(u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(NB_CLOSE_WAIT);
	u32 index = base + bucket_close_wait(ns);
	u64 *value = close_wait_duration_seconds.lookup(&index);
	if (value)
		*value += 1;
	index = base + NB_CLOSE_WAIT + 1;
	value = close_wait_duration_seconds.lookup(&index);
	if (value)
		*value += ns;
}
#endif /* COLLECT_METRICS */
