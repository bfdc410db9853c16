// SPDX-License-Identifier: GPL-2.0-only
/*
 * tcptrace.bpf.c - every TCP state change, each socket's lifecycle, and how
 * long TIME_WAIT really lasts.
 *
 * This file holds the entry points, each reading its tracepoint's arguments
 * and handing them to the part of the program (a header by concern) that
 * does the work (each uses only those included before it):
 *   maps.h          every map;
 *   helpers.h       counters, lifecycle ids, kernel reads, filters, owners;
 *   histograms.h    observations in the duration histograms;
 *   metrics.h       the per-state gauge, CLOSE_WAIT, ports per destination;
 *   events.h        the event of a step, to user space;
 *   lifecycle.h     one step of a lifecycle and how a connection closed;
 *   time_wait.h     TIME_WAIT, followed on the timewait socket;
 *   socket_state.h  the per-socket state machine (set_state), RSTs, retries.
 * tcptrace.h has the program's structures, tcptrace_interface.h what it and
 * user space agree on (generated from tcptrace_ebpf/kernel/interface.py).
 *
 * Compiled at run time by BCC. The loader (tcptrace_ebpf/kernel/probe.py)
 * puts each header in place of its #include (BCC rewrites map calls only
 * in the text it is given) and prepends a generated preamble with:
 *   - the feature macros (HAVE_*, USE_*, ...) of what the running kernel
 *     offers, by the table FEATURE_MACROS (tcptrace_ebpf/kernel/features.py);
 *   - struct tp_<event> tracepoint argument layouts, generated from the
 *     running kernel's tracefs format files (never from headers, which may
 *     describe another kernel);
 *   - OFF_* struct offsets read from the running kernel's BTF, used only with
 *     bpf_probe_read_kernel(), or as plain loads from the BTF-typed pointers
 *     of tp_btf programs (BTF_LOAD), which the verifier checks against that
 *     same BTF;
 *   - map sizes, the mode (EMIT_EVENTS, COLLECT_METRICS), filters, and the
 *     bucket_*() functions of the histograms.
 * The loader itself adds COMPILE_FALLBACKS (below) to the compiler's flags.
 *
 * Sockets are followed on sock:inet_sock_set_state. When a connection enters
 * TIME_WAIT the kernel replaces the socket by a timewait socket, whose life
 * no TCP tracepoint shows; we follow it through its timer (timer:timer_start,
 * timer_cancel, timer_expire_entry filtered on tw_timer_handler) and see the
 * peer's FIN reach it on skb:kfree_skb, whose rx_sk is the timewait socket.
 * Where the kernel has that rx_sk (USE_TW_EHASH), neither timer_start nor
 * timer_cancel is hooked (each runs for every timer the host starts or
 * moves: the kernel's dispatch alone costs a bulk stream): a new timewait
 * socket is found in the connection table when its full socket's CLOSE is
 * traced, a RST killing it on kfree_skb, a new connection reusing its pair
 * by that pair, and any other early end by user space's check_timewait.
 */
#include "tcptrace.h"
#include "maps.h"
#include "helpers.h"
#include "histograms.h"
#include "metrics.h"
#include "events.h"
#include "lifecycle.h"
#include "time_wait.h"
#include "socket_state.h"

/*
 * Where a tracepoint has a tp_btf program, its raw or classic one is only
 * a fallback for a kernel whose verifier refuses the tp_btf one. Compiling
 * the fallbacks costs a quarter of the compile (seconds; tens under
 * emulation), so the loader compiles without them (COMPILE_FALLBACKS 0)
 * and compiles again with them only after a refusal.
 */
#ifndef COMPILE_FALLBACKS
#define COMPILE_FALLBACKS 1
#endif
#define WANT_FALLBACK (!USE_TP_BTF || COMPILE_FALLBACKS)

/* ------------------------------------------------------------ TIME_WAIT -- */

#if HAVE_TIMEWAIT
/*
 * Entry points. Raw tracepoints (BTF-typed best) are preferred: cheaper, and
 * the kernel only refuses to nest a raw tracepoint program in itself, while
 * it skips a classic tracepoint program whenever any other one runs on the
 * CPU. These fire for every timer in the system, so with classic ones an
 * interrupt arriving in one of them made the kernel skip our state-change
 * program.
 */
#if USE_RAW_TIMERS
#if WANT_FALLBACK
#if !USE_TW_EHASH
int raw_timer_start(struct bpf_raw_tracepoint_args *ctx)
{
	u64 timer = ctx->args[0];
	return timer_started(ctx, timer, timer_function(timer));
}

int raw_timer_cancel(struct bpf_raw_tracepoint_args *ctx)
{
	return timer_cancelled(ctx, ctx->args[0], 0);
}
#endif

int raw_timer_expire_entry(struct bpf_raw_tracepoint_args *ctx)
{
	u64 timer = ctx->args[0];
	return timer_expiring(ctx, timer, timer_function(timer));
}
#endif /* WANT_FALLBACK */
#else
#if !USE_TW_EHASH
int on_timer_start(struct tp_timer_start *args)
{
	return timer_started(args, (u64)args->timer, (u64)args->function);
}

int on_timer_cancel(struct tp_timer_cancel *args)
{
	return timer_cancelled(args, (u64)args->timer, 0);
}
#endif

int on_timer_expire_entry(struct tp_timer_expire_entry *args)
{
	return timer_expiring(args, (u64)args->timer, (u64)args->function);
}
#endif
#if USE_TP_BTF
/* The same, BTF-typed (see BTF_LOAD): the timer's function is a plain load. */
#if !USE_TW_EHASH
int btf_timer_start(u64 *ctx)
{
	u64 timer = ctx[0];
	return timer_started(ctx, timer, BTF_LOAD(u64, timer, OFF_TIMER_FUNCTION));
}

int btf_timer_cancel(u64 *ctx)
{
	u64 timer = ctx[0];
	u64 function = BTF_LOAD(u64, timer, OFF_TIMER_FUNCTION);
	/* Only timewait timers concern us; the load is cheaper than a lookup. */
	if (function != TW_TIMER_HANDLER)
		return 0;
	return timer_cancelled(ctx, timer, function);
}
#endif

int btf_timer_expire_entry(u64 *ctx)
{
	u64 timer = ctx[0];
	return timer_expiring(ctx, timer, BTF_LOAD(u64, timer, OFF_TIMER_FUNCTION));
}
#endif

#if HAVE_KFREE_RX_SK
#if USE_RAW_KFREE
#if WANT_FALLBACK
int raw_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
	return skb_freed(ctx, ctx->args[KFREE_SKB_RX_SK_ARG]);
}
#endif
#else
int on_kfree_skb(struct tp_kfree_skb *args)
{
	return skb_freed(args, (u64)args->rx_sk);
}
#endif
#if USE_TP_BTF
int btf_kfree_skb(u64 *ctx)
{
	return skb_freed(ctx, ctx[KFREE_SKB_RX_SK_ARG]);
}
#endif
#endif

/* Run by user space (BPF_PROG_TEST_RUN), never attached: see tw_sweep_killed(). */
int sweep_killed(struct bpf_raw_tracepoint_args *ctx)
{
	return tw_sweep_killed(ctx);
}
#if CHECK_TW_FIN
/* Run by user space every second for each socket in tw_fin_wait2: see tw_sweep_fin_wait2(). */
int sweep_fin_wait2(struct bpf_raw_tracepoint_args *ctx)
{
	return tw_sweep_fin_wait2(ctx, ctx->args[0]);
}
#endif
/* Run by user space: see tw_sweep_stale(). */
int sweep_timewait(struct bpf_raw_tracepoint_args *ctx)
{
	return tw_sweep_stale(ctx, sweep_requested_sk());
}
#if USE_TW_EHASH
/* Run by user space on a batch of addresses in tw_check: see tw_check_unhashed(). */
int check_timewait(struct bpf_raw_tracepoint_args *ctx)
{
	return tw_check_unhashed(ctx->args[0]);
}

/* Run by user space on each address check_timewait found: see tw_sweep_unhashed(). */
int sweep_unhashed(struct bpf_raw_tracepoint_args *ctx)
{
	return tw_sweep_unhashed(ctx, ctx->args[0]);
}
#endif
#endif /* HAVE_TIMEWAIT */

/* ------------------------------------------------------------ set_state -- */

/*
 * Entry points, best first: BTF-typed raw tracepoint (tp_btf), raw, classic.
 * The classic tracepoint formats a record of every change first, which
 * costs several times our handler at full churn (and the kernel skips a
 * classic program whenever another runs on the CPU). Raw, we read what the
 * record would hold from the socket itself: the same fields the kernel's
 * TP_fast_assign reads, at offsets from the running kernel's BTF, in the
 * same byte orders; tp_btf reads them as plain loads (see BTF_LOAD), raw
 * with bpf_probe_read_kernel() (one read for sock_common's head, one for
 * inet_sock's, two more for IPv6 addresses).
 */
#if USE_RAW_SET_STATE && WANT_FALLBACK
/* The socket changing state, and its pair into t, if a TCP socket (else 0). */
static __always_inline u64 raw_tcp_sock(struct bpf_raw_tracepoint_args *ctx, struct tt_tuple *t)
{
	u64 sk = ctx->args[0];
	u16 protocol = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(sk + OFF_SK_PROTOCOL));
	if (protocol != TT_IPPROTO_TCP)
		return 0;
	tuple_from_sk(sk, t);
	return sk;
}

int raw_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	struct tt_tuple t = {};
	u64 sk = raw_tcp_sock(ctx, &t);
	if (!sk)
		return 0;
	return set_state(ctx, sk, (u8)ctx->args[1], (u8)ctx->args[2], t, false);
}
#endif
#if USE_TP_BTF
/* The same, BTF-typed (see BTF_LOAD): every field a plain load. */
static __always_inline u64 btf_tcp_sock(u64 *ctx, struct tt_tuple *t)
{
	/* sk itself if a full TCP socket (typed tcp_sock: inet_sock's fields are in it). */
	u64 sk = (u64)bpf_skc_to_tcp_sock((void *)ctx[0]);
	if (sk)
		tuple_from_btf_sk(sk, t);
	return sk;
}

int btf_inet_sock_set_state(u64 *ctx)
{
	struct tt_tuple t = {};
	u64 sk = btf_tcp_sock(ctx, &t);
	if (!sk)
		return 0;
	return set_state(ctx, sk, (u8)ctx[1], (u8)ctx[2], t, true);
}
#endif
#if !USE_RAW_SET_STATE
int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (args->protocol != TT_IPPROTO_TCP)
		return 0;
	struct tt_tuple t = {};
	TUPLE_FROM_RECORD(&t, args);
	return set_state(args, (u64)args->skaddr, args->oldstate, args->newstate, t, false);
}
#endif

#if HAVE_TIMEWAIT && USE_TW_EHASH
/*
 * A second program on the state change: did a new connection just reuse a
 * timewait socket's pair (see tw_reuse_check())? Only a child socket (at
 * its first change and its second: 6.1 and 6.12 trace the first before the
 * peer's address is set) or a connect() past SYN_SENT reads further than
 * `old` and `new`.
 */
#define NEW_CONNECTION(old, new)                                                                   \
	((old) == TT_SYN_SENT || (old) == TT_SYN_RECV || ((old) == TT_LISTEN && (new) == TT_SYN_RECV))

static __always_inline int reuse_of(void *ctx, u64 sk, bool typed, struct tt_tuple *t)
{
	if (!t->sport || !t->dport)
		return 0;
	t->netns = read_netns_of(sk, typed);
	return tw_reuse_check(ctx, t);
}

#if USE_RAW_SET_STATE && WANT_FALLBACK
int raw_tw_reuse(struct bpf_raw_tracepoint_args *ctx)
{
	if (!NEW_CONNECTION((u8)ctx->args[1], (u8)ctx->args[2]))
		return 0;
	struct tt_tuple t = {};
	u64 sk = raw_tcp_sock(ctx, &t);
	return sk ? reuse_of(ctx, sk, false, &t) : 0;
}
#endif
#if USE_TP_BTF
int btf_tw_reuse(u64 *ctx)
{
	if (!NEW_CONNECTION((u8)ctx[1], (u8)ctx[2]))
		return 0;
	struct tt_tuple t = {};
	u64 sk = btf_tcp_sock(ctx, &t);
	return sk ? reuse_of(ctx, sk, true, &t) : 0;
}
#endif
#if !USE_RAW_SET_STATE
int on_tw_reuse(struct tp_inet_sock_set_state *args)
{
	if (args->protocol != TT_IPPROTO_TCP || !NEW_CONNECTION(args->oldstate, args->newstate))
		return 0;
	struct tt_tuple t = {};
	TUPLE_FROM_RECORD(&t, args);
	return reuse_of(args, (u64)args->skaddr, false, &t);
}
#endif
#endif

/* Run by user space (BPF_PROG_TEST_RUN): see socket_sweep_gone(). */
int sweep_gone(struct bpf_raw_tracepoint_args *ctx)
{
	return socket_sweep_gone(ctx, sweep_requested_sk());
}

/* Run by user space (BPF_PROG_TEST_RUN): see socket_sweep_behind(). */
int sweep_behind(struct bpf_raw_tracepoint_args *ctx)
{
	return socket_sweep_behind(sweep_requested_sk());
}

/* Run by user space (BPF_PROG_TEST_RUN): see socket_sweep_pending_close(). */
int sweep_pending_close(struct bpf_raw_tracepoint_args *ctx)
{
	return socket_sweep_pending_close(ctx, sweep_requested_sk());
}

/* --------------------------------------------------- resets and retries -- */

/*
 * Raw where the kernel allows (USE_RAW_TCP_EVENTS): the kernel skips a
 * classic tracepoint program on a CPU where any other tracing program runs
 * (another BPF tool's, say) or a BPF map syscall is under way (as when user
 * space reads our maps); a skipped RST or SYN retransmission would give a
 * wrong close kind or count. A raw program is only skipped when it recurs
 * on its own CPU.
 */

#if HAVE_RESET_RECEIVED
#if USE_RAW_TCP_EVENTS
int raw_tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
	reset_received(ctx->args[0]);
	return 0;
}
#else
int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)
{
	reset_received((u64)args->skaddr);
	return 0;
}
#endif
#endif

#if HAVE_RESET_SENT
#if USE_RAW_TCP_EVENTS
int raw_tcp_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
	reset_sent(ctx, ctx->args[0]);
	return 0;
}
#else
int on_tcp_send_reset(struct tp_tcp_send_reset *args)
{
	reset_sent(args, (u64)args->skaddr);
	return 0;
}
#endif
#endif

#if HAVE_SYN_RETRANS
#if USE_RAW_TCP_EVENTS
int raw_tcp_retransmit_skb(struct bpf_raw_tracepoint_args *ctx)
{
	u64 sk = ctx->args[0];
	struct tt_sock *s = socks.lookup(&sk);
	/* Our state is the kernel's: SYN_SENT lasts until a change we see. */
	if (!s || s->id.state != TT_SYN_SENT)
		return 0;
	struct tt_tuple t = {};
	tuple_from_sk(sk, &t);
	syn_retransmitted(ctx, s, sk, &t);
	return 0;
}
#else
int on_tcp_retransmit_skb(struct tp_tcp_retransmit_skb *args)
{
	if (args->state != TT_SYN_SENT)
		return 0;
	u64 sk = (u64)args->skaddr;
	struct tt_sock *s = socks.lookup(&sk);
	if (!s)
		return 0;
	struct tt_tuple t = {};
	TUPLE_FROM_RECORD(&t, args);
	syn_retransmitted(args, s, sk, &t);
	return 0;
}
#endif
#endif
