// SPDX-License-Identifier: GPL-2.0-only
/*
 * tcptrace.bpf.c - every TCP state change, each socket's lifecycle, and how
 * long TIME_WAIT really lasts.
 *
 * Compiled at run time by BCC. The loader (tcptrace_ebpf/kernel/probe.py) prepends a
 * generated preamble with:
 *   - HAVE_* feature macros for what the running kernel offers;
 *   - struct tp_<event> tracepoint argument layouts, generated from the
 *     running kernel's tracefs format files (never from headers, which may
 *     describe another kernel);
 *   - OFF_* struct offsets read from the running kernel's BTF, used only with
 *     bpf_probe_read_kernel(), or as plain loads from the BTF-typed pointers
 *     of tp_btf programs (BTF_LOAD), which the verifier checks against that
 *     same BTF;
 *   - map sizes, the mode (EMIT_EVENTS, COLLECT_METRICS), filters, and the
 *     bucket_*() functions of the histograms.
 *
 * Sockets are followed on sock:inet_sock_set_state. When a connection enters
 * TIME_WAIT the kernel replaces the socket by a timewait socket, whose life
 * no TCP tracepoint shows; we follow it through its timer (timer:timer_start,
 * timer_cancel, timer_expire_entry filtered on tw_timer_handler) and see the
 * peer's FIN reach it on skb:kfree_skb, whose rx_sk is the timewait socket.
 */
#include "tcptrace.h"

/* ---------------------------------------------------------------- maps -- */

/*
 * Hash maps are not preallocated: their kernel memory follows the sockets
 * actually followed, up to the bound; a full map is counted, never silent.
 */

/* Per full socket: identity, owner, state and when it began. */
BPF_F_TABLE("hash", u64, struct tt_sock, socks, MAX_SOCKETS, BPF_F_NO_PREALLOC);
/* Per timewait socket whose timer is running, keyed by its address. */
BPF_F_TABLE("hash", u64, struct tt_timewait, timewait, MAX_TIMEWAIT, BPF_F_NO_PREALLOC);
/* Timewait sockets whose timer was cancelled, until classified. */
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
 * Lifecycle ids: a counter per CPU, with the CPU in the low bits, so ids are
 * unique without a global atomic (one shared cache line for every socket
 * born on the host would bounce between CPUs at high churn).
 */
#define TT_ID_CPU_BITS 12
BPF_PERCPU_ARRAY(next_sock_id, u64, 1);

/*
 * A timewait socket is created (and its timer started) just before the full
 * socket it replaces goes FIN_WAIT2/CLOSING -> CLOSE, on the same CPU: the
 * timer_start handler leaves it here for the set_state handler to take.
 */
struct tt_tw_slot {
	u64 tw;
	u64 ts_ns;
	u64 pair_fold;	/* tuple_fold() of its address pair; 0: not known */
	u8 substate;
};
BPF_PERCPU_ARRAY(tw_slot, struct tt_tw_slot, 1);

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
 * Pre-existing sockets seen for the first time (value: the state they left),
 * and news of pre-existing timewait sockets (TT_ADOPT_OLD_TIMEWAIT | state:
 * CLOSE once gone, or the state it is still in after its timer was re-armed).
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

/* ------------------------------------------------------------- helpers -- */

static __always_inline void count_n(u32 index, u64 n)
{
	u64 *value = counters.lookup(&index);
	if (value)
		*value += n;
}

static __always_inline void count(u32 index)
{
	count_n(index, 1);
}

/* The socket a sweep program is run for (user space wrote it); 0 if none. */
static __always_inline u64 sweep_requested_sk(void)
{
	u32 zero = 0;
	u64 *request = sweep_request_sk.lookup(&zero);
	return request ? *request : 0;
}

static __always_inline u64 new_sock_id(void)
{
	u32 zero = 0;
	u64 *next = next_sock_id.lookup(&zero);
	if (!next)
		return 0;
	*next += 1;
	return (*next << TT_ID_CPU_BITS) | (bpf_get_smp_processor_id() & ((1 << TT_ID_CPU_BITS) - 1));
}

#if USE_TP_BTF
/*
 * A field of a kernel object whose pointer came typed from BTF (a tp_btf
 * program's argument): a plain load, which the verifier checks against the
 * running kernel's BTF when loading and guards against faults, instead of a
 * bpf_probe_read_kernel() call. Offsets still come from that BTF.
 */
#define BTF_LOAD(type, base, off) (*(const volatile type *)((const char *)(base) + (off)))
#endif

static __always_inline u32 read_netns(u64 sk)
{
#if HAVE_NETNS
	u64 net = 0;
	u32 inum = 0;
	bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk + OFF_SKC_NET));
	if (net)
		bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + OFF_NET_NS_INUM));
	return inum;
#else
	return 0;
#endif
}

/* sk's network namespace; `typed`: sk is a BTF-typed pointer (tp_btf programs). */
static __always_inline u32 read_netns_of(u64 sk, bool typed)
{
#if HAVE_NETNS && USE_TP_BTF
	if (typed) {
		u64 net = BTF_LOAD(u64, sk, OFF_SKC_NET);
		return net ? BTF_LOAD(u32, net, OFF_NET_NS_INUM) : 0;
	}
#endif
	return read_netns(sk);
}

static __always_inline bool wanted(const struct tt_tuple *t, u32 pid)
{
#if FILTER_FAMILY
	if (t->family != FILTER_FAMILY)
		return false;
#endif
#if FILTER_PORTS
	u16 sport = t->sport, dport = t->dport;
	if (!filter_ports.lookup(&sport) && !filter_ports.lookup(&dport))
		return false;
#endif
#if FILTER_PID
	if (pid != FILTER_PID)
		return false;
#endif
	return true;
}

static __always_inline void set_owner_current(struct tt_ident *id, u8 source)
{
	id->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&id->comm, sizeof(id->comm));
	/* The cgroup v2 the caller runs in: user space names its container or pod. */
	id->cgroup_id = bpf_get_current_cgroup_id();
	id->owner_source = source;
}

/*
 * Which side closed first is whichever closing state came first: FIN_WAIT1,
 * FIN_WAIT2, TIME_WAIT (we did) or CLOSE_WAIT, LAST_ACK (the peer did).
 * The rule: tcptrace_ebpf/model/lifecycle.py's classify_close() keeps to it
 * (tests/test_interface.py compiles this and checks the two agree).
 */
static __always_inline void note_close_path(struct tt_ident *id, u8 state)
{
	if (state == TT_CLOSING)
		id->flags |= TT_SF_SAW_CLOSING;
	if (id->flags & (TT_SF_SAW_FIN_WAIT1 | TT_SF_SAW_CLOSE_WAIT))
		return;
	if (state == TT_FIN_WAIT1 || state == TT_FIN_WAIT2 || state == TT_TIME_WAIT)
		id->flags |= TT_SF_SAW_FIN_WAIT1;
	else if (state == TT_CLOSE_WAIT || state == TT_LAST_ACK)
		id->flags |= TT_SF_SAW_CLOSE_WAIT;
}

/*
 * `evflags` of the closing step: TT_EVF_NO_SYN when a connect() failed before
 * its SYN left. Without the kernel's segment count (no tcp_sock.segs_out in
 * BTF), a missing local port is the only sign of it.
 */
static __always_inline u8 close_kind(const struct tt_ident *id, u8 old, u16 sport, u32 evflags)
{
	if (id->role == TT_ROLE_LISTENER)
		return TT_CLOSE_LISTENER_CLOSED;
	if (id->last_reset == TT_RESET_RECEIVED)
		return old == TT_SYN_SENT ? TT_CLOSE_REFUSED : TT_CLOSE_RESET_RECEIVED;
	if (id->last_reset == TT_RESET_SENT)
		return TT_CLOSE_RESET_SENT;
	if (old == TT_SYN_SENT)
		return (HAVE_SEGS_OUT ? (evflags & TT_EVF_NO_SYN) : sport == 0) ?
			       TT_CLOSE_CONNECT_FAILED : TT_CLOSE_TIMEOUT;
	if (id->flags & TT_SF_SAW_CLOSING)
		return TT_CLOSE_SIMULTANEOUS;
	if (id->flags & TT_SF_SAW_CLOSE_WAIT)
		return TT_CLOSE_PASSIVE;
	if (id->flags & TT_SF_SAW_FIN_WAIT1)
		return TT_CLOSE_ACTIVE;
	/* Gone from ESTABLISHED or SYN_RECV without FIN or RST: timed out. */
	return TT_CLOSE_TIMEOUT;
}

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

static __always_inline u32 metric_role(u8 role)
{
	return role == TT_ROLE_CLIENT ? 0 : role == TT_ROLE_SERVER ? 1 : 2;
}

static __always_inline void gauge_add(u8 state, s64 delta)
{
	u32 index = state & (TT_STATE_SLOTS - 1);
	s64 *value = sockets.lookup(&index);
	if (value)
		*value += delta;
}

static __always_inline void close_wait_enter(u64 sk, const struct tt_ident *id,
					     const struct tt_tuple *t, u64 ts)
{
	struct tt_close_wait cw = {};
	cw.tuple = *t;
	cw.since_ns = ts;
	cw.sock_id = id->sock_id;
	cw.pid = id->pid;
	cw.owner_source = id->owner_source;
	cw.cgroup_id = id->cgroup_id;
	__builtin_memcpy(cw.comm, id->comm, sizeof(cw.comm));
	if (close_wait.update(&sk, &cw) != 0)
		count(TT_C_LOST_CLOSE_WAIT_MAP);
}
static __always_inline void dest_key(struct tt_dest *key, const struct tt_tuple *t)
{
	key->netns = t->netns;
	key->family = t->family;
	key->dport = t->dport;
	__builtin_memcpy(key->daddr, t->daddr, 16);
}

static __always_inline void dest_count(struct tt_ident *id, const struct tt_tuple *t)
{
	struct tt_dest key = {};
	dest_key(&key, t);
	s64 *value = dest_ports.lookup(&key);
	if (value) {
		__sync_fetch_and_add(value, 1);
	} else {
		s64 one = 1;
		if (dest_ports.update(&key, &one) != 0) {
			count(TT_C_LOST_DEST_MAP);
			return;
		}
	}
	id->flags |= TT_SF_DEST_COUNTED;
}

static __always_inline void dest_release(struct tt_ident *id, const struct tt_tuple *t)
{
	struct tt_dest key = {};
	dest_key(&key, t);
	s64 *value = dest_ports.lookup(&key);
	if (value && __sync_fetch_and_add(value, -1) <= 1)
		dest_ports.delete(&key);
	id->flags &= ~TT_SF_DEST_COUNTED;
}
#endif /* COLLECT_METRICS */

#if EMIT_EVENTS
static __always_inline void emit(void *ctx, struct tt_ident *id, const struct tt_tuple *t,
				 u64 skaddr, u8 old, u8 new, u64 ts, u32 flags, u8 tw_end)
{
	u32 zero = 0;
	struct tt_event *ev = event_scratch.lookup(&zero);
	if (!ev)
		return;
	ev->ts_ns = ts;
	ev->sock_id = id->sock_id;
	ev->skaddr = skaddr;
	ev->duration_ns = 0;
	if (id->state_ns && ts >= id->state_ns) {
		ev->duration_ns = ts - id->state_ns;
		flags |= TT_EVF_DURATION_KNOWN;
	}
	if (id->flags & TT_SF_PREEXISTING)
		flags |= TT_EVF_PREEXISTING;
	if (id->flags & TT_SF_LOST)
		flags |= TT_EVF_LOST_BEFORE;
	if (id->last_reset == TT_RESET_SENT)
		flags |= TT_EVF_RESET_SENT;
	else if (id->last_reset == TT_RESET_RECEIVED)
		flags |= TT_EVF_RESET_RECEIVED;
	ev->pid = id->pid;
	ev->flags = flags;
	__builtin_memcpy(ev->saddr, t->saddr, 16);
	__builtin_memcpy(ev->daddr, t->daddr, 16);
	ev->sport = t->sport;
	ev->dport = t->dport;
	ev->family = t->family;
	ev->seq = id->seq;
	ev->old_state = old;
	ev->new_state = new;
	ev->role = id->role;
	ev->owner_source = id->owner_source;
	ev->tw_end = tw_end;
	ev->pad = 0;
	ev->syn_retrans = id->syn_retrans;
	__builtin_memcpy(ev->comm, id->comm, sizeof(ev->comm));
	ev->cgroup_id = id->cgroup_id;
#if USE_RINGBUF
	/*
	 * Never wake the reader: a wakeup per event would cost more than the
	 * event. The reader polls every few tens of milliseconds instead, and
	 * the buffer is sized to hold far more than that at full churn.
	 */
	int err = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
#else
	int err = events.perf_submit(ctx, ev, sizeof(*ev));
#endif
	if (err) {
		count(TT_C_LOST_RINGBUF);
		id->flags |= TT_SF_LOST;
		u8 one = 1;
		lost_socks.update(&id->sock_id, &one);
	}
}
#endif /* EMIT_EVENTS */

/*
 * One step of a lifecycle: old -> new at ts. Emits the event, updates the
 * metrics and the socket's identity. `sport` is the local port now (0 while
 * a connect() has not bound one).
 */
static __always_inline void step(void *ctx, u64 sk, struct tt_ident *id, const struct tt_tuple *t,
				 u8 new, u64 ts, u32 evflags, u8 tw_end)
{
	u8 old = id->state;
	/* An end we never saw: clean up after it, count nothing about it. */
	bool unseen = evflags & TT_EVF_END_UNSEEN;
	bool finishes = (new == TT_CLOSE || new == TT_TIME_WAIT) && !unseen &&
			!(id->flags & TT_SF_FINISHED) && id->role != TT_ROLE_LISTENER;

	/* `old` too: a socket first seen mid-close starts in a closing state. */
	note_close_path(id, old);
	note_close_path(id, new);
	if (new == TT_CLOSE || (tw_end != TT_TW_END_NONE))
		evflags |= TT_EVF_LAST;

#if EMIT_EVENTS
	if (!id->pair_pending)
		emit(ctx, id, t, sk, old, new, ts, evflags, tw_end);
#endif

#if COLLECT_METRICS
	u32 index = (old & (TT_STATE_SLOTS - 1)) * TT_STATE_SLOTS + (new & (TT_STATE_SLOTS - 1));
	u64 *value = unseen ? 0 : state_transitions_total.lookup(&index);
	if (value)
		*value += 1;

	u64 in_old_ns = id->state_ns && ts >= id->state_ns ? ts - id->state_ns : 0;
	if (id->state_ns && !unseen) {
		observe_state_duration(old & (TT_STATE_SLOTS - 1), in_old_ns);
		if (old == TT_CLOSE_WAIT)
			observe_close_wait(0, in_old_ns);
		if (tw_end != TT_TW_END_NONE && old == TT_TIME_WAIT)
			observe_time_wait(tw_end, in_old_ns);
	}

	u32 role_row = metric_role(id->role) * PORT_SLOTS + (id->port_slot % PORT_SLOTS);
	if (new == TT_ESTABLISHED && (old == TT_SYN_SENT || old == TT_SYN_RECV) && id->state_ns)
		observe_handshake(role_row, in_old_ns);
	if (finishes) {
		u32 close = close_kind(id, old, t->sport, evflags);
		u32 cindex = role_row * TT_CLOSE_SLOTS + close;
		value = connections_closed_total.lookup(&cindex);
		if (value)
			*value += 1;
		if (id->birth_ns && ts >= id->birth_ns)
			observe_connection(role_row, ts - id->birth_ns);
	}

	if (id->flags & TT_SF_OLD_UNCOUNTED)
		id->flags &= ~TT_SF_OLD_UNCOUNTED;
	else
		gauge_add(old, -1);
	if (new != TT_CLOSE)
		gauge_add(new, 1);

	if (old == TT_CLOSE_WAIT)
		close_wait.delete(&sk);
	else if (new == TT_CLOSE_WAIT)
		close_wait_enter(sk, id, t, ts);
	if (new == TT_CLOSE && (id->flags & TT_SF_DEST_COUNTED))
		dest_release(id, t);
#endif /* COLLECT_METRICS */

	if (finishes)
		id->flags |= TT_SF_FINISHED;
	id->state = new;
	id->state_ns = ts;
	id->seq += 1;
}

static __always_inline void tuple_from_set_state(struct tt_tuple *t, struct tp_inet_sock_set_state *args)
{
	t->family = args->family;
	t->sport = args->sport;
	t->dport = args->dport;
	if (args->family == TT_AF_INET) {
		__builtin_memcpy(t->saddr, args->saddr, 4);
		__builtin_memcpy(t->daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(t->saddr, args->saddr_v6, 16);
		__builtin_memcpy(t->daddr, args->daddr_v6, 16);
	}
}

/*
 * Before 6.13 an accepted child changes LISTEN -> SYN_RECV as a copy of its
 * listener (inet_csk_clone_lock() sets the state before the ports and
 * tcp_v4/v6_syn_recv_sock() the addresses): no peer, and a wildcard local
 * address. Its SYN_RECV event is held (id->pair_pending) until the next
 * change, which has the full pair; then it is told, as of when it happened,
 * with that pair, and the pair is checked against cancelled timewait
 * sockets (the reuse match needs the peer).
 */
#if HAVE_TIMEWAIT
static __always_inline void tw_match_reuse(void *ctx, struct tt_tuple *t);
#endif

static __always_inline void tell_pending_pair(void *ctx, u64 sk, struct tt_ident *id,
					      struct tt_tuple *t)
{
	id->pair_pending = 0;
#if EMIT_EVENTS
	/* As it was then: its first event, no time in LISTEN known. */
	u16 seq = id->seq;
	u64 state_ns = id->state_ns;
	id->seq = seq - 1;
	id->state_ns = 0;
	emit(ctx, id, t, sk, TT_LISTEN, TT_SYN_RECV, state_ns, 0, TT_TW_END_NONE);
	id->seq = seq;
	id->state_ns = state_ns;
#endif
#if HAVE_TIMEWAIT
	tw_match_reuse(ctx, t);
#endif
}

/*
 * The socket we followed at this address ended without us seeing it: the
 * kernel skips a tracing program when another one runs on the same CPU
 * (an interrupt while one of ours runs), and counts that as a recursion
 * miss. Close its lifecycle now, flagged, and count the loss.
 */
static __always_inline void end_unseen(void *ctx, u64 sk, struct tt_ident *id,
				       const struct tt_tuple *t, u64 now, u32 evflags)
{
	count(TT_C_MISSED_END);
	/* A child whose pair never came: nothing of it was told; its end is. */
	id->pair_pending = 0;
	id->flags |= TT_SF_LOST;
	id->state_ns = 0;
	step(ctx, sk, id, t, TT_CLOSE, now, evflags | TT_EVF_END_UNSEEN, TT_TW_END_NONE);
}

/* Close a held socket for good, as of when it went to CLOSE. */
static __always_inline void finish_pending_close(void *ctx, u64 sk, struct tt_pending_close *p)
{
	u32 evflags = 0;
#if HAVE_TIMEWAIT
	/* An active close with no RST and no timewait socket: the kernel made none. */
	if (p->s.id.state == TT_FIN_WAIT2 && !p->s.id.last_reset) {
		count(TT_C_TW_SKIPPED);
		evflags |= TT_EVF_NO_TIME_WAIT;
	}
#endif
	step(ctx, sk, &p->s.id, &p->s.tuple, TT_CLOSE, p->ts_ns, evflags, TT_TW_END_NONE);
}

/*
 * States from which tcp_disconnect() sends a RST after the CLOSE
 * (tcp_need_reset()); LAST_ACK -> CLOSE is the normal end and is not held.
 */
static __always_inline bool rst_may_follow_close(u8 old)
{
	return old == TT_ESTABLISHED || old == TT_CLOSE_WAIT || old == TT_FIN_WAIT1 ||
	       old == TT_FIN_WAIT2 || old == TT_SYN_RECV;
}

/* ----------------------------------------------------------- TIME_WAIT -- */

#if HAVE_TIMEWAIT
/*
 * The peer's FIN reached timewait socket e, in FIN_WAIT2, while nobody
 * looked: we learn it at now_ns (jiffies_now). On its arrival the kernel
 * re-armed the timer for TCP_TIMEWAIT_LEN, so the timer's expiry tells when
 * TIME_WAIT began, to the jiffy.
 */
static __always_inline void tw_fin_came(void *ctx, struct tt_timewait *e, u64 now_ns,
					u64 expires_j, u64 jiffies_now)
{
	u64 began_ns = now_ns;
	u64 began_j = expires_j - TIMEWAIT_LEN_JIFFIES;
	if (expires_j && (s64)(jiffies_now - began_j) >= 0) {
		u64 ago_ns = (jiffies_now - began_j) * NS_PER_JIFFY;
		began_ns = ago_ns < now_ns ? now_ns - ago_ns : 0;
	}
	if (began_ns < e->id.state_ns)
		began_ns = e->id.state_ns;
	if (began_ns > now_ns)
		began_ns = now_ns;
	step(ctx, e->skaddr, &e->id, &e->tuple, TT_TIME_WAIT, began_ns,
	     TT_EVF_TIMEWAIT_SOCK | TT_EVF_INFERRED_TIME, TT_TW_END_NONE);
}

/*
 * A timewait socket of ours has ended (timer fired, or a new connection
 * reused its address pair, or it was killed), at end_ns. Finishes its
 * FIN_WAIT2 -> TIME_WAIT step first if the peer's FIN reached it unseen.
 * `substate`, `expires_j` and `jiffies_now` describe it at its end.
 */
static __always_inline void tw_finish(void *ctx, struct tt_timewait *e, u64 end_ns, u8 tw_end,
				      u8 substate, u64 expires_j, u64 jiffies_now)
{
	if (e->id.state == TT_FIN_WAIT2 && substate == TT_TIME_WAIT)
		tw_fin_came(ctx, e, end_ns, expires_j, jiffies_now);
	step(ctx, e->skaddr, &e->id, &e->tuple, TT_CLOSE, end_ns, TT_EVF_TIMEWAIT_SOCK, tw_end);
}

static __always_inline u8 tw_read_substate(u64 tw)
{
#if HAVE_TW_SUBSTATE
	u8 substate = 0;
	bpf_probe_read_kernel(&substate, 1, (void *)(tw + OFF_TW_SUBSTATE));
	return substate;
#else
	return 0;
#endif
}

static __always_inline u64 tw_read_expires(u64 tw)
{
#if HAVE_TIMER_EXPIRES
	u64 expires = 0;
	bpf_probe_read_kernel(&expires, sizeof(expires),
			      (void *)(tw + OFF_TW_TIMER + OFF_TIMER_EXPIRES));
	return expires;
#else
	return 0;
#endif
}

/* The peer's FIN reached a timewait socket still in FIN_WAIT2: seen live. */
static __always_inline void tw_check_fin(void *ctx, u64 tw, struct tt_timewait *e, u64 now)
{
	if (e->id.state == TT_FIN_WAIT2 && tw_read_substate(tw) == TT_TIME_WAIT)
		step(ctx, e->skaddr, &e->id, &e->tuple, TT_TIME_WAIT, now, TT_EVF_TIMEWAIT_SOCK,
		     TT_TW_END_NONE);
}

/* A new connection with this address pair: did it reuse a cancelled timewait socket? */
static __always_inline void tw_match_reuse(void *ctx, struct tt_tuple *t)
{
	struct tt_timewait *k = tw_killed.lookup(t);
	if (!k)
		return;
	tw_finish(ctx, k, k->killed_ns, TT_TW_END_REUSED, k->killed_substate,
		  k->killed_expires_jiffies, k->killed_jiffies);
	tw_killed.delete(t);
}

#if USE_RAW_TIMERS || WATCH_OLD_TIMEWAIT
static __always_inline u64 timer_function(u64 timer)
{
	u64 function = 0;
	bpf_probe_read_kernel(&function, sizeof(function), (void *)(timer + OFF_TIMER_FUNCTION));
	return function;
}
#endif

/* The address pair of a timewait socket, from its sock_common (as for a full socket). */
static __always_inline void tw_tuple(u64 tw, struct tt_tuple *t)
{
#if HAVE_TW_TUPLE
	u16 dport = 0;
	bpf_probe_read_kernel(&t->family, 2, (void *)(tw + OFF_SKC_FAMILY));
	bpf_probe_read_kernel(&t->sport, 2, (void *)(tw + OFF_SKC_NUM)); /* host order */
	bpf_probe_read_kernel(&dport, 2, (void *)(tw + OFF_SKC_DPORT));
	t->dport = ntohs(dport);
	if (t->family == TT_AF_INET) {
		bpf_probe_read_kernel(t->saddr, 4, (void *)(tw + OFF_SKC_RCV_SADDR));
		bpf_probe_read_kernel(t->daddr, 4, (void *)(tw + OFF_SKC_DADDR));
	} else {
		bpf_probe_read_kernel(t->saddr, 16, (void *)(tw + OFF_SKC_V6_RCV_SADDR));
		bpf_probe_read_kernel(t->daddr, 16, (void *)(tw + OFF_SKC_V6_DADDR));
	}
	t->netns = read_netns(tw);
#endif
}

/* Whether a timewait socket still has this address pair (always, if we cannot read it). */
static __always_inline bool same_tuple(const struct tt_tuple *x, const struct tt_tuple *y)
{
	const u32 *a = (const u32 *)x, *b = (const u32 *)y;
#pragma unroll
	for (int i = 0; i < sizeof(*x) / 4; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

/*
 * An address pair folded into 64 bits, netns aside: one comparison tells a
 * timewait socket's pair from a state change's (which has no netns yet).
 */
static __always_inline u64 tuple_fold(const struct tt_tuple *t)
{
	const u32 *w = (const u32 *)t;
	u64 fold = 0xcbf29ce484222325ULL;
	/* Every word but the first (the netns): family, ports, both addresses. */
#pragma unroll
	for (int i = 1; i < sizeof(*t) / 4; i++)
		fold = (fold ^ w[i]) * 0x100000001b3ULL;
	return fold | 1;
}

static __always_inline bool tw_has_tuple(u64 tw, struct tt_tuple *t, const struct tt_tuple *pair)
{
#if HAVE_TW_TUPLE
	tw_tuple(tw, t);
	return same_tuple(t, pair);
#endif
	return true;
}

#if WATCH_OLD_TIMEWAIT
/*
 * Timewait sockets older than tracing are counted by user space from its
 * snapshot; we never followed them, but their timer shows when they go. Only
 * while user space still counts some: otherwise every cancelled timer in the
 * system would cost a read here.
 */
static __always_inline bool watching_old_timewait(void)
{
	u32 zero = 0;
	u32 *watch = watch_old_timewait.lookup(&zero);
	return watch && *watch;
}

static __always_inline void old_timewait_news(const struct tt_tuple *t, u8 state)
{
	u8 value = TT_ADOPT_OLD_TIMEWAIT | state;
	if (adopted.update(t, &value) != 0)
		count(TT_C_LOST_ADOPTED_MAP);
}
#endif

static __always_inline int timer_started(void *ctx, u64 timer, u64 function)
{
	if (function != TW_TIMER_HANDLER)
		return 0;
	u64 tw = timer - OFF_TW_TIMER;
	u64 now = bpf_ktime_get_ns();
	u32 zero = 0;

	struct tt_timewait *e = timewait.lookup(&tw);
	struct tt_tw_slot *slot = tw_slot.lookup(&zero);
	if (e) {
		/* Re-armed: the peer's FIN (or a duplicate) arrived. */
		tw_check_fin(ctx, tw, e, now);
		/*
		 * Or a new timewait socket where one whose end we missed was: if
		 * a full socket closes right after on this CPU, it was.
		 */
		if (slot) {
			slot->tw = tw;
			slot->ts_ns = now;
			slot->substate = tw_read_substate(tw);
			slot->pair_fold = 0;
		}
		return 0;
	}
	/*
	 * A cancel of one of ours is matched however long this CPU took to
	 * get from it to this start (our own programs included, a virtual CPU
	 * under emulation or preempted by its host can take far more than
	 * 100 us): a move keeps the pair and finds its parked record, which a
	 * new connection on that pair claims (tw_match_reuse) long before it
	 * can close into a new timewait socket in the same memory.
	 */
	struct tt_cancel_slot *cs = cancel_slot.lookup(&zero);
	if (cs && cs->tw == tw && (cs->followed || now - cs->ts_ns < 100000)) {
		cs->tw = 0;
		struct tt_tuple t = {};
		/*
		 * Not a death if the same pair is there: mod_timer moved the timer
		 * to another bucket. (A different pair is a new timewait socket in
		 * the memory of the one just freed.)
		 */
		if (tw_has_tuple(tw, &t, &cs->tuple)) {
			struct tt_timewait *k = tw_killed.lookup(&cs->tuple);
			if (k && k->killed_ns == cs->ts_ns) {
				struct tt_timewait alive = *k;
				alive.killed_ns = 0;
#if COLLECT_METRICS
				/* Only moved: back in the gauge (timer_cancelled took it out). */
				if (alive.id.flags & TT_SF_OLD_UNCOUNTED) {
					gauge_add(alive.id.state, 1);
					alive.id.flags &= ~TT_SF_OLD_UNCOUNTED;
				}
#endif
				tw_killed.delete(&cs->tuple);
				if (timewait.update(&tw, &alive) == 0) {
					e = timewait.lookup(&tw);
					if (e)
						tw_check_fin(ctx, tw, e, now);
				}
				return 0;
			}
			/*
			 * Ours, and no longer parked: a new connection took the pair
			 * (tw_match_reuse) and is closing into TIME_WAIT again, in the
			 * memory just freed. A new timewait socket, below; returning
			 * here lost it (counted as skipped) in back-to-back reuse.
			 */
			if (!cs->followed) {
#if WATCH_OLD_TIMEWAIT
				if (!k && watching_old_timewait()) {
					/* An old timewait socket lives on (the peer's FIN re-armed it). */
					u8 substate = tw_read_substate(tw);
					old_timewait_news(&t, substate ? substate : TT_TIME_WAIT);
				}
#endif
				return 0;
			}
		}
	}
	/* A new timewait socket: its full socket goes to CLOSE right after. */
	if (slot) {
		slot->tw = tw;
		slot->ts_ns = now;
		slot->substate = tw_read_substate(tw);
		slot->pair_fold = 0;
#if HAVE_TW_TUPLE
		struct tt_tuple pair = {};
		tw_tuple(tw, &pair);
		slot->pair_fold = tuple_fold(&pair);
#if CHECK_TW_FIN
		/* (Any pid: a timer starts in whatever process runs.) */
		if (slot->substate == TT_FIN_WAIT2 && wanted(&pair, FILTER_PID)) {
			if (tw_fin_wait2.update(&tw, &now) != 0)
				count(TT_C_LOST_FIN_WAIT2_MAP);
		}
#endif
#endif
	}
	return 0;
}

/* `function`: the timer's, if the caller read it already (0: not read). */
static __always_inline int timer_cancelled(void *ctx, u64 timer, u64 function)
{
	u64 tw = timer - OFF_TW_TIMER;
	struct tt_timewait *e = timewait.lookup(&tw);
	if (!e) {
#if WATCH_OLD_TIMEWAIT
		if (watching_old_timewait() &&
		    (function ? function : timer_function(timer)) == TW_TIMER_HANDLER) {
			/* One older than tracing goes (or moves: see timer_started). */
			u32 zero = 0;
			struct tt_cancel_slot *cs = cancel_slot.lookup(&zero);
			if (cs) {
				cs->tw = tw;
				cs->ts_ns = bpf_ktime_get_ns();
				cs->followed = 0;
				tw_tuple(tw, &cs->tuple);
				old_timewait_news(&cs->tuple, TT_CLOSE);
			}
		}
#endif
		return 0;
	}
	/*
	 * Removed early (reused, RST, ss -K, netns exit) or being re-armed in
	 * another bucket (see cancel_slot). Either way the memory may be freed
	 * soon: record what we need now, and park it by address pair until a
	 * new connection claims the pair or user space sweeps it.
	 */
	u64 now = bpf_ktime_get_ns();
#if COLLECT_METRICS
	/*
	 * The kernel has dropped it (ss no longer shows it): it leaves the gauge
	 * now, not when we learn how it ended. Its closing step then moves no
	 * gauge; a cancel that was only a move gives it back (see timer_started).
	 */
	if (!(e->id.flags & TT_SF_OLD_UNCOUNTED)) {
		gauge_add(e->id.state, -1);
		e->id.flags |= TT_SF_OLD_UNCOUNTED;
	}
#endif
	e->killed_ns = now;
	e->killed_jiffies = bpf_jiffies64();
	e->killed_expires_jiffies = tw_read_expires(tw);
	e->killed_substate = tw_read_substate(tw);
	struct tt_tuple key = e->tuple;
	struct tt_timewait *previous = tw_killed.lookup(&key);
	if (previous) {
		/* An older cancelled socket with this pair was never claimed. */
		tw_finish(ctx, previous, previous->killed_ns, TT_TW_END_KILLED,
			  previous->killed_substate, previous->killed_expires_jiffies,
			  previous->killed_jiffies);
		tw_killed.delete(&key);
	}
	if (tw_killed.update(&key, e) != 0) {
		count(TT_C_LOST_KILLED_MAP);
		tw_finish(ctx, e, now, TT_TW_END_KILLED, e->killed_substate,
			  e->killed_expires_jiffies, e->killed_jiffies);
	}
	u32 zero = 0;
	struct tt_cancel_slot *cs = cancel_slot.lookup(&zero);
	if (cs) {
		cs->tw = tw;
		cs->ts_ns = now;
		cs->tuple = key;
		cs->followed = 1;
	}
	timewait.delete(&tw);
	return 0;
}

static __always_inline int timer_expiring(void *ctx, u64 timer, u64 function)
{
	if (function != TW_TIMER_HANDLER)
		return 0;
	u64 tw = timer - OFF_TW_TIMER;
	u64 now = bpf_ktime_get_ns();
	struct tt_timewait *e = timewait.lookup(&tw);
	if (e) {
		tw_finish(ctx, e, now, TT_TW_END_EXPIRED, tw_read_substate(tw), tw_read_expires(tw),
			  bpf_jiffies64());
		timewait.delete(&tw);
		return 0;
	}
	/*
	 * The timer wheel detaches a timer (traced as timer_cancel) just before
	 * running it, so timer_cancelled() parked this one: take it back.
	 */
	u32 zero = 0;
	struct tt_cancel_slot *cs = cancel_slot.lookup(&zero);
	if (!cs || cs->tw != tw)
		return 0;
	struct tt_timewait *k = tw_killed.lookup(&cs->tuple);
	if (k && k->killed_ns == cs->ts_ns) {
		tw_finish(ctx, k, now, TT_TW_END_EXPIRED, tw_read_substate(tw), tw_read_expires(tw),
			  bpf_jiffies64());
		tw_killed.delete(&cs->tuple);
	}
	cs->tw = 0;
	return 0;
}

/* A segment processed by a timewait socket is freed with rx_sk = it. */
static __always_inline int skb_freed(void *ctx, u64 rx_sk)
{
	if (!rx_sk)
		return 0;
	struct tt_timewait *e = timewait.lookup(&rx_sk);
	if (e)
		tw_check_fin(ctx, rx_sk, e, bpf_ktime_get_ns());
	return 0;
}

/*
 * Entry points. Raw tracepoints (BTF-typed best) are preferred: cheaper, and
 * the kernel only refuses to nest a raw tracepoint program in itself, while
 * it skips a classic tracepoint program whenever any other one runs on the
 * CPU. These fire for every timer in the system, so with classic ones an
 * interrupt arriving in one of them made the kernel skip our state-change
 * program.
 */
#if USE_RAW_TIMERS
int raw_timer_start(struct bpf_raw_tracepoint_args *ctx)
{
	u64 timer = ctx->args[0];
	return timer_started(ctx, timer, timer_function(timer));
}

int raw_timer_cancel(struct bpf_raw_tracepoint_args *ctx)
{
	return timer_cancelled(ctx, ctx->args[0], 0);
}

int raw_timer_expire_entry(struct bpf_raw_tracepoint_args *ctx)
{
	u64 timer = ctx->args[0];
	return timer_expiring(ctx, timer, timer_function(timer));
}
#else
int on_timer_start(struct tp_timer_start *args)
{
	return timer_started(args, (u64)args->timer, (u64)args->function);
}

int on_timer_cancel(struct tp_timer_cancel *args)
{
	return timer_cancelled(args, (u64)args->timer, 0);
}

int on_timer_expire_entry(struct tp_timer_expire_entry *args)
{
	return timer_expiring(args, (u64)args->timer, (u64)args->function);
}
#endif
#if USE_TP_BTF
/* The same, BTF-typed (see BTF_LOAD): the timer's function is a plain load. */
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

int btf_timer_expire_entry(u64 *ctx)
{
	u64 timer = ctx[0];
	return timer_expiring(ctx, timer, BTF_LOAD(u64, timer, OFF_TIMER_FUNCTION));
}
#endif

#if HAVE_KFREE_RX_SK
#if USE_RAW_KFREE
int raw_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
	return skb_freed(ctx, ctx->args[KFREE_SKB_RX_SK_ARG]);
}
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

/*
 * Run by user space (BPF_PROG_TEST_RUN), never attached: finishes as
 * "killed" the cancelled timewait socket whose address pair user space put
 * in sweep_request, once no new connection claimed it within the grace
 * period. One per run: such sockets are rare, and a loop over many would
 * exceed what the verifier accepts.
 */
int sweep_killed(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	struct tt_tuple *request = sweep_request.lookup(&zero);
	if (!request)
		return 0;
	struct tt_tuple key = *request;
	struct tt_timewait *e = tw_killed.lookup(&key);
	if (!e)
		return 0;
	tw_finish(ctx, e, e->killed_ns, TT_TW_END_KILLED, e->killed_substate,
		  e->killed_expires_jiffies, e->killed_jiffies);
	tw_killed.delete(&key);
	return 1;
}
#if CHECK_TW_FIN
/*
 * Run by user space (BPF_PROG_TEST_RUN) every second for each socket in
 * tw_fin_wait2, whose address is the run's argument: a timewait socket of
 * ours still in FIN_WAIT2 for all we saw. If the peer's FIN has come, it
 * moves to TIME_WAIT as of then. Returns 1 if so.
 */
int sweep_fin_wait2(struct bpf_raw_tracepoint_args *ctx)
{
	u64 tw = ctx->args[0];
	u64 now = bpf_ktime_get_ns();
	struct tt_timewait *e = timewait.lookup(&tw);
	if (e && e->id.state == TT_FIN_WAIT2) {
		if (tw_read_substate(tw) != TT_TIME_WAIT)
			return 0;	/* still waiting: checked again next time */
		tw_fin_came(ctx, e, now, tw_read_expires(tw), bpf_jiffies64());
		tw_fin_wait2.delete(&tw);
		return 1;
	}
	/*
	 * Gone, in TIME_WAIT already, or never ours; or its full socket's
	 * close, which makes it ours, has not run yet on the other CPU.
	 */
	u64 *started = tw_fin_wait2.lookup(&tw);
	if (!e && started && now - *started < 1000000000)
		return 0;
	tw_fin_wait2.delete(&tw);
	return 0;
}
#endif

/*
 * Run by user space (BPF_PROG_TEST_RUN): a timewait socket followed for far
 * longer than TIME_WAIT lasts, whose end we must have missed.
 */
int sweep_timewait(struct bpf_raw_tracepoint_args *ctx)
{
	u64 tw = sweep_requested_sk();
	struct tt_timewait *e = timewait.lookup(&tw);
	if (!e)
		return 0;
	end_unseen(ctx, e->skaddr, &e->id, &e->tuple, bpf_ktime_get_ns(), TT_EVF_TIMEWAIT_SOCK);
	timewait.delete(&tw);
	return 1;
}
#endif /* HAVE_TIMEWAIT */

/* ---------------------------------------------------------- set_state -- */

/*
 * Listener owners are kept per (netns, port) so that a child, born in
 * softirq context where the current task is not its owner, gets the owner
 * of the listener that accepted it. Kept for every listener, whatever the
 * filters, since a filtered-in child may belong to any of them.
 */
static __always_inline void track_listener(u32 netns, u16 port, bool listening)
{
	struct tt_listener_key key = {.netns = netns, .port = port};
	struct tt_listener *l = listeners.lookup(&key);
	if (listening) {
		u32 pid = bpf_get_current_pid_tgid() >> 32;
		if (l) {
			if (l->pid != pid)
				l->ambiguous = 1;
			l->count += 1;
			return;
		}
		struct tt_listener fresh = {.pid = pid, .count = 1};
		bpf_get_current_comm(&fresh.comm, sizeof(fresh.comm));
		fresh.cgroup_id = bpf_get_current_cgroup_id();
		if (listeners.insert(&key, &fresh) != 0)
			count(TT_C_LOST_LISTENER_MAP);
	} else if (l) {
		if (l->count <= 1)
			listeners.delete(&key);
		else
			l->count -= 1;
	}
}

/*
 * First sight of a socket: born now (connect, listen, accepted child) or
 * born before tracing started. Fills *fresh; returns false if the filters
 * do not want it.
 */
static __always_inline bool first_sight(struct tt_sock *fresh, struct tt_tuple *t, u8 old, u8 new,
					u64 now)
{
	struct tt_ident *id = &fresh->id;
	t->netns = fresh->tuple.netns;
	if (old == TT_CLOSE && new == TT_SYN_SENT) {
		id->role = TT_ROLE_CLIENT;
		set_owner_current(id, TT_OWNER_CONNECT);
	} else if (old == TT_CLOSE && new == TT_LISTEN) {
		id->role = TT_ROLE_LISTENER;
		set_owner_current(id, TT_OWNER_LISTEN);
	} else {
		struct tt_listener_key lk = {.netns = fresh->tuple.netns, .port = t->sport};
		struct tt_listener *l = listeners.lookup(&lk);
		if (old == TT_LISTEN && new == TT_SYN_RECV) {
			id->role = TT_ROLE_SERVER;
		} else {
			/*
			 * Born before we started. A socket whose local port has a
			 * listener in its namespace is that listener's child;
			 * otherwise it made the connection.
			 */
			id->role = l ? TT_ROLE_SERVER : TT_ROLE_CLIENT;
			id->flags |= TT_SF_PREEXISTING;
		}
		/* Its owner is the listener's, unless several processes listen there. */
		if (l && id->role == TT_ROLE_SERVER && !l->ambiguous) {
			id->pid = l->pid;
			__builtin_memcpy(id->comm, l->comm, sizeof(id->comm));
			id->cgroup_id = l->cgroup_id;
			id->owner_source = TT_OWNER_LISTENER;
		}
	}
	if (!wanted(t, id->pid))
		return false;
	count(TT_C_SOCKETS_BORN);
	id->sock_id = new_sock_id();
	id->state = old;
	/* Its first state (entered from CLOSE or LISTEN) was never in the gauge. */
	id->flags |= TT_SF_OLD_UNCOUNTED;
	/* How long it sat in CLOSE (or was a listener's) before is not ours to know. */
	if (!(id->flags & TT_SF_PREEXISTING))
		id->birth_ns = now;
#if COLLECT_METRICS
	if (id->flags & TT_SF_PREEXISTING) {
		/* User space counted it from its start-up snapshot: tell it we have it now. */
		u8 state = old;
		if (adopted.update(t, &state) != 0)
			count(TT_C_LOST_ADOPTED_MAP);
	} else if (id->role != TT_ROLE_LISTENER) {
#if PORT_SLOTS > 1
		if (id->role == TT_ROLE_SERVER) {
			u16 port = t->sport;
			u8 *ps = port_slots.lookup(&port);
			if (ps)
				id->port_slot = *ps;
		}
#endif
		u32 oindex = metric_role(id->role) * PORT_SLOTS + (id->port_slot % PORT_SLOTS);
		u64 *opened = connections_opened_total.lookup(&oindex);
		if (opened)
			*opened += 1;
	}
#endif
	return true;
}

/*
 * The u32 at `offset` in tcp_sock sk: a plain load through a BTF-typed
 * pointer (`typed`), else bpf_probe_read_kernel(). Inlined, so `offset` is
 * the constant the verifier needs for the plain load.
 */
static __always_inline u32 tcp_sock_u32(u64 sk, u32 offset, bool typed)
{
#if USE_TP_BTF
	if (typed)
		return BTF_LOAD(u32, sk, offset);
#endif
	u32 value = 0;
	bpf_probe_read_kernel(&value, sizeof(value), (void *)(sk + offset));
	return value;
}

/*
 * An accepted socket is born in SYN_RECV when the client's last ACK comes
 * (until then the kernel keeps a request sock, which no tracepoint shows),
 * so its SYN_RECV began a round trip before we saw it: when the SYN came and
 * the SYN-ACK left. Just before making it ESTABLISHED the kernel takes that
 * round trip (SYN-ACK out to ACK in) as the socket's first RTT sample,
 * srtt_us = rtt << 3. The SYN-ACK left in SYN_RECV: date SYN_RECV, and the
 * connection's birth, back to then. A Fast Open child, made at the SYN
 * itself, is older than that already and keeps its dates.
 */
static __always_inline void date_back_syn_recv(struct tt_ident *id, u64 sk, bool typed, u64 now)
{
#if HAVE_SYNACK_RTT
	u32 srtt_us = tcp_sock_u32(sk, OFF_TCP_SRTT_US, typed);
	u64 rtt_ns = (u64)(srtt_us >> 3) * 1000;
	if (!rtt_ns || rtt_ns >= now || !id->state_ns)
		return;
	u64 synack_sent_ns = now - rtt_ns;
	if (synack_sent_ns >= id->state_ns)
		return;
	if (id->birth_ns == id->state_ns)
		id->birth_ns = synack_sent_ns;
	id->state_ns = synack_sent_ns;
#endif
}

/*
 * Whether a connecting socket sent its SYN. connect() sets SYN_SENT before it
 * picks the local port and checks the address pair is free; when that fails
 * (EADDRNOTAVAIL: no free port, or an explicitly bound port whose pair is in
 * use) the socket goes back to CLOSE with nothing sent, and the kernel counts
 * no ActiveOpens. tcp_sock.segs_out counts every segment sent, the SYN first.
 */
static __always_inline bool syn_sent(u64 sk, bool typed)
{
#if HAVE_SEGS_OUT
	return tcp_sock_u32(sk, OFF_TCP_SEGS_OUT, typed) != 0;
#else
	return true;
#endif
}

#if HAVE_SYN_RETRANS && HAVE_TOTAL_RETRANS
/*
 * Count the SYNs connecting socket sk sent again that the kernel counted
 * (TCPSynRetrans) and we have not yet: tcp_sock.total_retrans is raised
 * next to TCPSynRetrans in __tcp_retransmit_skb, and in SYN_SENT only SYNs
 * are sent again. The tcp_retransmit_skb tracepoint alone is not that
 * count: since 6.18 it also fires for attempts given up before the SYN left
 * (no route; its last copy still queued below TCP), which the kernel does
 * not count, and before 6.18 it does not fire for a SYN the kernel counted
 * whose transmission then failed (a firewall's drop on the way out). Run on
 * each of those events and when SYN_SENT ends, which also makes up for an
 * event that never reached us. id->syn_retrans holds what was counted.
 */
static __always_inline void syn_retrans_catch_up(struct tt_ident *id, u64 sk, bool typed)
{
	u32 total = tcp_sock_u32(sk, OFF_TCP_TOTAL_RETRANS, typed);
	if (total > 0xffff)
		total = 0xffff;
	if (total <= id->syn_retrans)
		return;
	count_n(TT_C_SYN_RETRANS, total - id->syn_retrans);
	id->syn_retrans = total;
}

/*
 * The same when a connecting socket leaves SYN_SENT (its SYNs are all sent),
 * for one we followed from its connect(). Written without a branch on `old`:
 * set_state is near the verifier's limit, and a test of `old` here would
 * split every path after it in two (the verifier tracks `old` precisely, it
 * indexes the metric arrays), while these values are never compared.
 */
static __always_inline void syn_sent_ends(struct tt_ident *id, u64 sk, bool typed, u8 old)
{
	u64 other_state = old ^ TT_SYN_SENT;
	asm volatile("" : "+r"(other_state));
	/* 1 if old is SYN_SENT and the socket is not older than tracing, else 0. */
	u64 ends = ((other_state - 1) >> 63) & (~(u64)id->flags & TT_SF_PREEXISTING);
	u32 total = 0;
	if (ends)
		total = tcp_sock_u32(sk, OFF_TCP_TOTAL_RETRANS, typed);
	u64 diff = (u64)total - id->syn_retrans;
	asm volatile("" : "+r"(diff));
	/* diff if not negative, else 0 (total is 0 unless SYN_SENT ends). */
	u64 more = diff & ((diff >> 63) - 1);
	if (more) {
		count_n(TT_C_SYN_RETRANS, more);
		id->syn_retrans += more;
	}
}
#endif

/*
 * One TCP state change of socket sk: old -> new, t its address pair now.
 * `typed`: sk is a BTF-typed pointer (a constant: the branches on it go).
 */
static __always_inline int set_state(void *args, u64 sk, u8 old, u8 new, struct tt_tuple t,
				     bool typed)
{
	count(TT_C_EVENTS);
	u64 now = bpf_ktime_get_ns();
	/*
	 * sk as a map key, in a variable of its own: the 6.1 and 6.12 verifiers
	 * turn a typed pointer spilled to the stack into a scalar once a helper
	 * has read that stack slot (as a map key), and refuse the typed loads
	 * after it. The empty asm keeps the compiler from merging the two.
	 */
	u64 key = sk;
	asm volatile("" : "+r"(key));

	if (new == TT_LISTEN || (old == TT_LISTEN && new == TT_CLOSE))
		track_listener(read_netns_of(sk, typed), t.sport, new == TT_LISTEN);

	/* Take the timewait socket the kernel made for this one just now, if any. */
	u64 tw = 0;
	u8 tw_substate = 0;
#if HAVE_TIMEWAIT
	if (new == TT_CLOSE) {
		u32 zero = 0;
		struct tt_tw_slot *slot = tw_slot.lookup(&zero);
		if (slot && slot->tw) {
			/*
			 * Made just before this close on this CPU: within a
			 * millisecond, or later with the same pair (a virtual
			 * CPU can stall for milliseconds between the two).
			 */
			if ((old == TT_FIN_WAIT2 || old == TT_CLOSING) &&
			    (now - slot->ts_ns < 1000000 || slot->pair_fold == tuple_fold(&t))) {
				tw = slot->tw;
				tw_substate = slot->substate;
			}
			slot->tw = 0;
		}
	}
#endif

	struct tt_sock *s = socks.lookup(&key);
	if (s && s->id.state != old &&
	    (old == TT_CLOSE || (old == TT_LISTEN && new == TT_SYN_RECV))) {
		/* A new socket where one we followed was: that one ended unseen. */
		end_unseen(args, key, &s->id, &s->tuple, now, 0);
		socks.delete(&key);
		s = NULL;
	}
	if (!s) {
		/* The memory of a socket held in pending_close was reused: it got no RST. */
		struct tt_pending_close *held = pending_close.lookup(&key);
		if (held) {
			finish_pending_close(args, key, held);
			pending_close.delete(&key);
		}
		struct tt_sock fresh = {};
		fresh.tuple.netns = read_netns_of(sk, typed);
		if (!first_sight(&fresh, &t, old, new, now))
			return 0;
		fresh.tuple = t;
		if (old == TT_LISTEN && new == TT_SYN_RECV && !t.dport)
			fresh.id.pair_pending = 1;
		if (new == TT_CLOSE) {
			/* Born and gone in one step, or first seen on its way out. */
			u32 once = old == TT_SYN_SENT && !syn_sent(sk, typed) ? TT_EVF_NO_SYN : 0;
			step(args, key, &fresh.id, &t, new, now, once, TT_TW_END_NONE);
			return 0;
		}
#if COLLECT_METRICS
		if (fresh.id.role == TT_ROLE_CLIENT)
			dest_count(&fresh.id, &t);
#endif
		if (socks.insert(&key, &fresh) != 0) {
			count(TT_C_LOST_SOCKET_MAP);
#if COLLECT_METRICS
			if (fresh.id.flags & TT_SF_DEST_COUNTED)
				dest_release(&fresh.id, &t);
#endif
#if EMIT_EVENTS
			fresh.id.sock_id = 0;
			emit(args, &fresh.id, &t, key, old, new, now, TT_EVF_UNTRACKED, TT_TW_END_NONE);
#endif
			return 0;
		}
		s = socks.lookup(&key);
		if (!s)
			return 0;
	}
	struct tt_ident *id = &s->id;
#if HAVE_SYN_RETRANS && HAVE_TOTAL_RETRANS
	syn_sent_ends(id, sk, typed, old);
#endif
	t.netns = s->tuple.netns;
	s->tuple = t;
	if (id->pair_pending && t.dport)
		tell_pending_pair(args, key, id, &t);
	if (id->state != old) {
		/* A change we never saw (see end_unseen): carry on from the kernel's state. */
		count(TT_C_MISSED_TRANSITION);
		id->flags |= TT_SF_LOST;
#if COLLECT_METRICS
		/* The gauge follows: it counted the socket in the state we recorded. */
		if (!(id->flags & TT_SF_OLD_UNCOUNTED)) {
			gauge_add(id->state, -1);
			gauge_add(old, 1);
		}
#endif
		id->state = old;
		id->state_ns = 0;
	}

	/*
	 * Only the process holding the socket closes it (close(), shutdown() or
	 * its exit), and these two steps happen in that call: a reliable owner
	 * for a child we only knew through its listener.
	 */
	if ((old == TT_ESTABLISHED && new == TT_FIN_WAIT1) ||
	    (old == TT_CLOSE_WAIT && new == TT_LAST_ACK)) {
		if (id->role != TT_ROLE_CLIENT && id->owner_source != TT_OWNER_CLOSER)
			set_owner_current(id, TT_OWNER_CLOSER);
	}
	if (old == TT_SYN_RECV && new == TT_ESTABLISHED && id->role == TT_ROLE_SERVER)
		date_back_syn_recv(id, sk, typed, now);

#if HAVE_TIMEWAIT
	/* A new connection on an address pair whose timewait socket was just cancelled? */
	if ((old == TT_LISTEN && new == TT_SYN_RECV && t.dport) || (old == TT_SYN_SENT && t.sport != 0))
		tw_match_reuse(args, &t);

	if (tw) {
		/* The connection lives on as a timewait socket. */
		struct tt_timewait e = {};
		e.id = s->id;
		e.tuple = t;
		e.skaddr = key;
		e.created_ns = now;
		struct tt_timewait *stale = timewait.lookup(&tw);
		if (stale) {
			/* Its memory held a timewait socket whose end we missed. */
			end_unseen(args, stale->skaddr, &stale->id, &stale->tuple, now,
				   TT_EVF_TIMEWAIT_SOCK);
			timewait.delete(&tw);
		}
		/* In substate FIN_WAIT2 it still waits for the peer's FIN: no step yet. */
		if (tw_substate != TT_FIN_WAIT2)
			step(args, key, &e.id, &t, TT_TIME_WAIT, now, 0, TT_TW_END_NONE);
		if (timewait.update(&tw, &e) != 0) {
			count(TT_C_LOST_TIMEWAIT_MAP);
			e.id.flags |= TT_SF_LOST;
			step(args, key, &e.id, &t, TT_CLOSE, now, 0, TT_TW_END_NONE);
		}
		socks.delete(&key);
		return 0;
	}
#endif
	u32 evflags = 0;
	if (old == TT_SYN_SENT && new == TT_CLOSE && !syn_sent(sk, typed))
		evflags |= TT_EVF_NO_SYN;
	if (new == TT_CLOSE && !id->last_reset && rst_may_follow_close(old)) {
		struct tt_pending_close held = {};
		held.s = *s;
		held.s.tuple = t;
		held.ts_ns = now;
		if (pending_close.update(&key, &held) == 0) {
			socks.delete(&key);
			return 0;
		}
		/* Map full: close it now; a RST that follows goes unseen. */
	}
#if HAVE_TIMEWAIT
	/* We saw no timewait socket start: the kernel made none (tcp_max_tw_buckets). */
	if (new == TT_CLOSE && (old == TT_FIN_WAIT2 || old == TT_CLOSING) && !id->last_reset) {
		count(TT_C_TW_SKIPPED);
		evflags |= TT_EVF_NO_TIME_WAIT;
	}
#endif
	step(args, key, id, &t, new, now, evflags, TT_TW_END_NONE);
	if (new == TT_CLOSE)
		socks.delete(&key);
	return 0;
}


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
#if USE_RAW_SET_STATE
/* The address pair of full socket sk, as the tracepoints' records hold it. */
static __always_inline void tuple_from_sk(u64 sk, struct tt_tuple *t)
{
	u8 head[SK_HEAD_LEN] = {};
	u8 inet[INET_HEAD_LEN] = {};
	bpf_probe_read_kernel(head, sizeof(head), (void *)(sk + SK_HEAD_START));
	bpf_probe_read_kernel(inet, sizeof(inet), (void *)(sk + INET_HEAD_START));
	u16 sport = 0, dport = 0;
	__builtin_memcpy(&t->family, head + (OFF_SKC_FAMILY - SK_HEAD_START), 2);
	__builtin_memcpy(&dport, head + (OFF_SKC_DPORT - SK_HEAD_START), 2);
	__builtin_memcpy(&sport, inet + (OFF_INET_SPORT - INET_HEAD_START), 2);
	t->sport = ntohs(sport);
	t->dport = ntohs(dport);
	if (t->family == TT_AF_INET) {
		__builtin_memcpy(t->saddr, inet + (OFF_INET_SADDR - INET_HEAD_START), 4);
		__builtin_memcpy(t->daddr, head + (OFF_SKC_DADDR - SK_HEAD_START), 4);
	} else {
		bpf_probe_read_kernel(t->saddr, 16, (void *)(sk + OFF_SKC_V6_RCV_SADDR));
		bpf_probe_read_kernel(t->daddr, 16, (void *)(sk + OFF_SKC_V6_DADDR));
	}
}

int raw_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	u64 sk = ctx->args[0];
	u16 protocol = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(sk + OFF_SK_PROTOCOL));
	if (protocol != TT_IPPROTO_TCP)
		return 0;
	struct tt_tuple t = {};
	tuple_from_sk(sk, &t);
	return set_state(ctx, sk, (u8)ctx->args[1], (u8)ctx->args[2], t, false);
}
#endif
#if USE_TP_BTF
/* The same, BTF-typed (see BTF_LOAD): every field a plain load. */
int btf_inet_sock_set_state(u64 *ctx)
{
	/* sk itself if a full TCP socket (typed tcp_sock: inet_sock's fields are in it). */
	u64 sk = (u64)bpf_skc_to_tcp_sock((void *)ctx[0]);
	if (!sk)
		return 0;
	struct tt_tuple t = {};
	t.family = BTF_LOAD(u16, sk, OFF_SKC_FAMILY);
	t.sport = ntohs(BTF_LOAD(u16, sk, OFF_INET_SPORT));
	t.dport = ntohs(BTF_LOAD(u16, sk, OFF_SKC_DPORT));
	u32 *saddr = (u32 *)t.saddr, *daddr = (u32 *)t.daddr;
	if (t.family == TT_AF_INET) {
		saddr[0] = BTF_LOAD(u32, sk, OFF_INET_SADDR);
		daddr[0] = BTF_LOAD(u32, sk, OFF_SKC_DADDR);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			saddr[i] = BTF_LOAD(u32, sk, OFF_SKC_V6_RCV_SADDR + 4 * i);
			daddr[i] = BTF_LOAD(u32, sk, OFF_SKC_V6_DADDR + 4 * i);
		}
	}
	return set_state(ctx, sk, (u8)ctx[1], (u8)ctx[2], t, true);
}
#endif
#if !USE_RAW_SET_STATE
int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)
{
	if (args->protocol != TT_IPPROTO_TCP)
		return 0;
	struct tt_tuple t = {};
	tuple_from_set_state(&t, args);
	return set_state(args, (u64)args->skaddr, args->oldstate, args->newstate, t, false);
}
#endif

/*
 * Run by user space (BPF_PROG_TEST_RUN): a socket we follow (full or
 * timewait) that sock_diag no longer lists, its end unseen (a lost event):
 * closed now, flagged, so the gauge counts what exists. Only if it is still
 * the lifecycle user space found gone (its memory may hold a new one since).
 */
int sweep_gone(struct bpf_raw_tracepoint_args *ctx)
{
	u64 sk = sweep_requested_sk();
	u32 zero = 0;
	u64 *want = sweep_request_id.lookup(&zero);
	if (!want)
		return 0;
	struct tt_sock *s = socks.lookup(&sk);
	if (s && s->id.sock_id == *want) {
		end_unseen(ctx, sk, &s->id, &s->tuple, bpf_ktime_get_ns(), 0);
		socks.delete(&sk);
		return 1;
	}
#if HAVE_TIMEWAIT
	struct tt_timewait *e = timewait.lookup(&sk);
	if (e && e->id.sock_id == *want) {
		end_unseen(ctx, e->skaddr, &e->id, &e->tuple, bpf_ktime_get_ns(),
			   TT_EVF_TIMEWAIT_SOCK);
		timewait.delete(&sk);
		return 1;
	}
#endif
	return 0;
}

/*
 * Run by user space (BPF_PROG_TEST_RUN): a close held in pending_close for
 * longer than any RST of an abortive close takes to follow: it had none.
 */
int sweep_pending_close(struct bpf_raw_tracepoint_args *ctx)
{
	u64 sk = sweep_requested_sk();
	struct tt_pending_close *held = pending_close.lookup(&sk);
	if (!held)
		return 0;
	finish_pending_close(ctx, sk, held);
	pending_close.delete(&sk);
	return 1;
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
static __always_inline void reset_received(u64 sk)
{
	struct tt_sock *s = socks.lookup(&sk);
	if (s)
		s->id.last_reset = TT_RESET_RECEIVED;
}
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
static __always_inline void reset_sent(void *ctx, u64 sk)
{
	if (!sk)
		return;
	struct tt_pending_close *held = pending_close.lookup(&sk);
	if (held) {
		/* The RST of an abortive close, just after its CLOSE. */
		held->s.id.last_reset = TT_RESET_SENT;
		finish_pending_close(ctx, sk, held);
		pending_close.delete(&sk);
		return;
	}
	struct tt_sock *s = socks.lookup(&sk);
	if (s)
		s->id.last_reset = TT_RESET_SENT;
}
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
/* Connecting socket s (sk, address pair t) tried to send its SYN again. */
static __always_inline void syn_retransmitted(void *ctx, struct tt_sock *s, u64 sk,
					      struct tt_tuple *t)
{
#if HAVE_TOTAL_RETRANS
	syn_retrans_catch_up(&s->id, sk, false);
#else
	s->id.syn_retrans += 1;
	count(TT_C_SYN_RETRANS);
#endif
#if HAVE_TIMEWAIT
	/* The pair is known now even if the connect never completes. */
	t->netns = s->tuple.netns;
	tw_match_reuse(ctx, t);
#endif
}
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
	t.family = args->family;
	t.sport = args->sport;
	t.dport = args->dport;
	if (args->family == TT_AF_INET) {
		__builtin_memcpy(t.saddr, args->saddr, 4);
		__builtin_memcpy(t.daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(t.saddr, args->saddr_v6, 16);
		__builtin_memcpy(t.daddr, args->daddr_v6, 16);
	}
	syn_retransmitted(args, s, sk, &t);
	return 0;
}
#endif
#endif
