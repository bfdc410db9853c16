/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * maps.h - every map of the program (tcptrace.bpf.c includes it first).
 *
 * The loader (tcptrace_ebpf/kernel/probe.py) hands BCC the program with its
 * headers put in place, as one text: BCC rewrites map calls such as
 * socks.lookup() only in that text, never in a file included by the compiler.
 */

/*
 * Hash maps are not preallocated: their kernel memory follows the sockets
 * actually followed, up to the bound; a full map is counted, never silent.
 */

/* Per full socket: identity, owner, state and when it began. */
BPF_F_TABLE("hash", u64, struct tt_sock, socks, MAX_SOCKETS, BPF_F_NO_PREALLOC);
/* Per timewait socket whose timer is running, keyed by its address. */
BPF_F_TABLE("hash", u64, struct tt_timewait, timewait, MAX_TIMEWAIT, BPF_F_NO_PREALLOC);
/*
 * Timewait sockets removed early (their timer cancelled; with USE_TW_EHASH,
 * found unhashed), by address pair, until classified: reused or killed.
 */
BPF_F_TABLE("hash", struct tt_tuple, struct tt_timewait, tw_killed, MAX_KILLED, BPF_F_NO_PREALLOC);
/* Owner of the listeners of each (netns, port), for their children. */
BPF_F_TABLE("hash", struct tt_listener_key, struct tt_listener, listeners, MAX_LISTENERS,
	    BPF_F_NO_PREALLOC);

/*
 * An abortive close (SO_LINGER 0, unread data, connect(AF_UNSPEC)) sets
 * CLOSE *before* sending its RST (tcp_disconnect). So a close from a state
 * where that can happen is held here until the RST is seen, or until user
 * space sweeps it (no RST came: the connection timed out).
 */
struct tt_pending_close {
	struct tt_sock s;
	u64 ts_ns;
};
BPF_F_TABLE("hash", u64, struct tt_pending_close, pending_close, MAX_PENDING_CLOSE,
	    BPF_F_NO_PREALLOC);

/*
 * How many entries tw_killed holds, per slot of their address pairs (by
 * their ports), and pending_close holds (the last slot). A lookup in either
 * map on every new connection cost a cache miss on a cold bucket, about a
 * tenth of the set_state program's time under churn, and almost always
 * found nothing: it is skipped while the count it would need is 0 (see
 * helpers.h). Counted on an insert that succeeded and a delete that removed
 * something, so never below the truth; a lookup causally after an insert
 * sees its count. Per slot, a pair being reused is not looked up for every
 * other pair parked meanwhile (under churn one is, most of the time).
 */
#define TT_PARKED_SLOTS 256
#define TT_PARKED_CLOSES TT_PARKED_SLOTS
BPF_ARRAY(parked, s64, TT_PARKED_SLOTS + 1);

/*
 * Lifecycle ids: a counter per CPU, with the CPU in the low bits, so ids are
 * unique without a global atomic (one shared cache line for every socket
 * born on the host would bounce between CPUs at high churn). TT_ID_CPU_BITS
 * is in tcptrace_interface.h: user space tells ids born by a moment apart.
 */
BPF_PERCPU_ARRAY(next_sock_id, u64, 1);

#if !USE_TW_EHASH
/*
 * A timewait socket is created (and its timer started) just before the full
 * socket it replaces goes FIN_WAIT2/CLOSING -> CLOSE, on the same CPU: the
 * timer_start handler leaves it here for the set_state handler to take.
 * (With USE_TW_EHASH that handler finds it in the connection table.)
 */
struct tt_tw_slot {
	u64 tw;
	u64 ts_ns;
	u64 pair_fold;	/* tuple_fold() of its address pair; 0: not known */
	u8 substate;
};
BPF_PERCPU_ARRAY(tw_slot, struct tt_tw_slot, 1);
#endif

#if USE_TW_EHASH
/*
 * timer_cancel is not hooked here: it runs for every timer the host moves
 * (each TCP retransmit and delayed-ACK timer), and the kernel's dispatch
 * alone cost a bulk stream over veth 1 % of its throughput. A timewait
 * socket's early end is found instead: a new connection on its address pair
 * finds it here (tw_reuse_check), a RST kills it before the segment is
 * freed (skb_freed), and what kills it unseen (ss -K, its namespace's exit)
 * is found unhashed by check_timewait, which user space runs every second
 * or so on every timewait socket followed, TT_TW_CHECK_BATCH at a time
 * through tw_check.
 */
BPF_F_TABLE("hash", struct tt_tuple, u64, tw_pairs, MAX_TIMEWAIT, BPF_F_NO_PREALLOC);
struct tt_tw_check {
	u64 tw[TT_TW_CHECK_BATCH];	/* addresses, as tw_pairs holds them */
};
BPF_ARRAY(tw_check, struct tt_tw_check, 1);
#else
/*
 * timer_cancel is traced not only when a timer is deleted but also when
 * mod_timer moves it to another wheel bucket (then timer_start follows) and
 * when the wheel detaches it to run it (then timer_expire_entry follows),
 * back to back on one CPU. A cancel is only a death if neither follows.
 */
struct tt_cancel_slot {
	u64 tw;
	u64 ts_ns;
	struct tt_tuple tuple;
	u64 followed;	/* the cancelled socket was ours (parked in tw_killed) */
};
BPF_PERCPU_ARRAY(cancel_slot, struct tt_cancel_slot, 1);
#endif

#if CHECK_TW_FIN
/*
 * Without skb:kfree_skb's rx_sk (before 6.11) the peer's FIN reaching a
 * timewait socket in FIN_WAIT2 is not seen when it comes: the kernel
 * re-arms the socket's timer, but a re-arm that stays in the same bucket of
 * the timer wheel is not traced, and most do (a 60 s timer's bucket spans
 * 512 jiffies). The timer starts of such sockets are kept here, and user
 * space has each checked every second (sweep_fin_wait2).
 */
BPF_F_TABLE("hash", u64, u64, tw_fin_wait2, MAX_TIMEWAIT, BPF_F_NO_PREALLOC);
#endif

BPF_PERCPU_ARRAY(counters, u64, TT_COUNTER_SLOTS);

#if FILTER_PORTS
/* Ports to trace (local or remote), filled by user space. */
BPF_HASH(filter_ports, u16, u8, 1024);
#endif

/* Sweep requests from user space: entries found past their grace period. */
BPF_ARRAY(sweep_request, struct tt_tuple, 1);
BPF_ARRAY(sweep_request_sk, u64, 1);
/* With sweep_request_sk for sweep_gone: the lifecycle user space found gone. */
BPF_ARRAY(sweep_request_id, u64, 1);
/* With sweep_request_sk for sweep_behind: the socket and the states found. */
BPF_ARRAY(sweep_request_behind, struct tt_behind, 1);

#if EMIT_EVENTS
BPF_PERCPU_ARRAY(event_scratch, struct tt_event, 1);
/*
 * Lifecycles that lost an event. Later events of a lifecycle carry the news
 * (TT_EVF_LOST_BEFORE), but when its last events are lost nothing would:
 * user space reads this when it reports lifecycles that never ended.
 */
BPF_TABLE("lru_hash", u64, u8, lost_socks, 65536);
#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
#endif /* EMIT_EVENTS */

#if COLLECT_METRICS
/*
 * Metrics, aggregated here and read when Prometheus scrapes. Each map is
 * named after its metric (tcptrace_<map name>). Histograms are flat per-CPU
 * arrays: for each label row, NB buckets (le = bound), one +Inf bucket and
 * the sum in nanoseconds.
 */
BPF_PERCPU_ARRAY(state_transitions_total, u64, TT_STATE_SLOTS * TT_STATE_SLOTS);
BPF_PERCPU_ARRAY(sockets, s64, TT_STATE_SLOTS);
BPF_PERCPU_ARRAY(state_duration_seconds, u64, TT_STATE_SLOTS * HIST_ROW(NB_STATE));
BPF_PERCPU_ARRAY(handshake_duration_seconds, u64, TT_METRIC_ROLES * PORT_SLOTS * HIST_ROW(NB_HANDSHAKE));
BPF_PERCPU_ARRAY(connection_duration_seconds, u64, TT_METRIC_ROLES * PORT_SLOTS * HIST_ROW(NB_CONNECTION));
BPF_PERCPU_ARRAY(connections_opened_total, u64, TT_METRIC_ROLES * PORT_SLOTS);
BPF_PERCPU_ARRAY(connections_closed_total, u64, TT_METRIC_ROLES * PORT_SLOTS * TT_CLOSE_SLOTS);
BPF_PERCPU_ARRAY(time_wait_duration_seconds, u64, TT_TW_END_SLOTS * HIST_ROW(NB_TIME_WAIT));
BPF_PERCPU_ARRAY(close_wait_duration_seconds, u64, HIST_ROW(NB_CLOSE_WAIT));
/* Sockets now in CLOSE_WAIT, with when they entered it and their owner. */
BPF_F_TABLE("hash", u64, struct tt_close_wait, close_wait, MAX_CLOSE_WAIT, BPF_F_NO_PREALLOC);
/*
 * Local ports in use towards each remote address:port: client sockets from
 * connect() to the end of their TIME_WAIT. connect() to a destination fails
 * (EADDRNOTAVAIL) once its count reaches the ephemeral port range.
 */
BPF_F_TABLE("hash", struct tt_dest, s64, dest_ports, MAX_DESTS, BPF_F_NO_PREALLOC);
/*
 * Pre-existing sockets the program now follows, or saw close (value: the
 * state they were first seen leaving), and news of pre-existing timewait
 * sockets (TT_ADOPT_OLD_TIMEWAIT | state: CLOSE once gone, or the state it
 * is still in after its timer was re-armed).
 * Drained by user space, which counts those sockets from its snapshot.
 */
BPF_F_TABLE("hash", struct tt_tuple, u8, adopted, MAX_ADOPTED, BPF_F_NO_PREALLOC);
#if WATCH_OLD_TIMEWAIT
/* Non-zero while user space still counts timewait sockets from its snapshot. */
BPF_ARRAY(watch_old_timewait, u32, 1);
#endif
#if PORT_SLOTS > 1
/* Local listening port -> row of the `port` label; missing: row 0 ("other"). */
BPF_HASH(port_slots, u16, u8, PORT_SLOTS);
#endif
#endif /* COLLECT_METRICS */
