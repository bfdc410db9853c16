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
#define TT_HIST_STATE		0	/* state_duration_seconds */
#define TT_HIST_HANDSHAKE	1	/* handshake_duration_seconds */
#define TT_HIST_CONNECTION	2	/* connection_duration_seconds */
#define TT_HIST_TIME_WAIT	3	/* time_wait_duration_seconds */
#define TT_HIST_CLOSE_WAIT	4	/* close_wait_duration_seconds */

/*
 * The cell of histogram `hist` at *index. BCC calls a map's methods only
 * through its name (never through a pointer, nor from a macro), hence the
 * switch; `hist` is a constant wherever this is inlined, so only its own
 * case is compiled there.
 */
static __always_inline u64 *histogram_cell(u32 hist, u32 *index)
{
	switch (hist) {
	case TT_HIST_STATE:
		return state_duration_seconds.lookup(index);
	case TT_HIST_HANDSHAKE:
		return handshake_duration_seconds.lookup(index);
	case TT_HIST_CONNECTION:
		return connection_duration_seconds.lookup(index);
	case TT_HIST_TIME_WAIT:
		return time_wait_duration_seconds.lookup(index);
	case TT_HIST_CLOSE_WAIT:
		return close_wait_duration_seconds.lookup(index);
	}
	return 0;
}

/* Buckets of histogram `hist` (bounds: tcptrace_ebpf/kernel/buckets.py). */
static __always_inline u32 histogram_buckets(u32 hist)
{
	switch (hist) {
	case TT_HIST_STATE:
		return NB_STATE;
	case TT_HIST_HANDSHAKE:
		return NB_HANDSHAKE;
	case TT_HIST_CONNECTION:
		return NB_CONNECTION;
	case TT_HIST_TIME_WAIT:
		return NB_TIME_WAIT;
	case TT_HIST_CLOSE_WAIT:
		return NB_CLOSE_WAIT;
	}
	return 0;
}

/* The bucket of histogram `hist` that ns falls in. */
static __always_inline u32 histogram_bucket(u32 hist, u64 ns)
{
	switch (hist) {
	case TT_HIST_STATE:
		return bucket_state(ns);
	case TT_HIST_HANDSHAKE:
		return bucket_handshake(ns);
	case TT_HIST_CONNECTION:
		return bucket_connection(ns);
	case TT_HIST_TIME_WAIT:
		return bucket_time_wait(ns);
	case TT_HIST_CLOSE_WAIT:
		return bucket_close_wait(ns);
	}
	return 0;
}

/*
 * One observation of ns in row `row` of histogram `hist`: a count in its
 * bucket, ns added to its sum. Written to compile as the one function per
 * histogram it replaces did, to the instruction: computing the bucket
 * before the row's base moved registers around enough to cost the
 * verifier 22% more on set_state (829,499 instructions processed instead
 * of 679,276 on 6.18).
 */
static __always_inline void observe(u32 hist, u32 row, u64 ns)
{
	u32 base = row * HIST_ROW(histogram_buckets(hist));
	u32 index = base + histogram_bucket(hist, ns);
	u64 *value = histogram_cell(hist, &index);
	if (value)
		*value += 1;
	index = base + histogram_buckets(hist) + 1;
	value = histogram_cell(hist, &index);
	if (value)
		*value += ns;
}
#endif /* COLLECT_METRICS */
