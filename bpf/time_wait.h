/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * time_wait.h - TIME_WAIT, followed on the timewait socket that replaces a
 * full socket (HAVE_TIMEWAIT): through its timer (started, cancelled,
 * expired; with USE_TW_EHASH only expired), the peer's FIN or a RST
 * reaching it (kfree_skb's rx_sk, or the fin_wait2 sweep where the kernel
 * has no rx_sk), the reuse of its address pair by a new connection, and the
 * sweeps user space runs for what no tracepoint shows (with USE_TW_EHASH:
 * check_timewait, for the sockets killed unseen).
 */

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

#if USE_TW_EHASH
/* Whether timewait socket tw is still in the connection table (not killed). */
static __always_inline bool tw_hashed(u64 tw)
{
	u64 pprev = 0;
	bpf_probe_read_kernel(&pprev, sizeof(pprev),
			      (void *)(tw + OFF_SKC_NULLS_NODE + sizeof(void *)));
	return pprev != 0;
}
#endif

/* Follow timewait socket tw, of record e (by address, and by pair: see tw_pairs). */
static __always_inline int tw_follow(u64 tw, struct tt_timewait *e)
{
	int err = timewait.update(&tw, e);
#if USE_TW_EHASH
	if (err == 0 && tw_pairs.update(&e->tuple, &tw) != 0) {
		timewait.delete(&tw);
		err = -1;
	}
#endif
	return err;
}

/* Stop following timewait socket tw, of record e. */
static __always_inline void tw_forget(u64 tw, const struct tt_timewait *e)
{
#if USE_TW_EHASH
	struct tt_tuple pair = e->tuple;
	u64 *followed = tw_pairs.lookup(&pair);
	/* (A newer timewait socket of ours may have the pair now.) */
	if (followed && *followed == tw)
		tw_pairs.delete(&pair);
#endif
	timewait.delete(&tw);
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

/*
 * Whether the timewait socket at tw still has the ports of e, our record of
 * the one there: not if e's end went unseen and tw's memory now holds
 * another connection's timewait socket (always, if we cannot tell). Then
 * what tw shows (its substate, its timer) is not e's to take. One read where
 * the two ports sit side by side, as in sock_common.
 */
static __always_inline bool tw_has_ports(u64 tw, const struct tt_timewait *e)
{
#if HAVE_TW_TUPLE
	u16 ports[2] = {};
#if OFF_SKC_NUM == OFF_SKC_DPORT + 2
	if (bpf_probe_read_kernel(ports, sizeof(ports), (void *)(tw + OFF_SKC_DPORT)))
		return true;
#else
	if (bpf_probe_read_kernel(&ports[0], 2, (void *)(tw + OFF_SKC_DPORT)) ||
	    bpf_probe_read_kernel(&ports[1], 2, (void *)(tw + OFF_SKC_NUM)))
		return true;
#endif
	return ntohs(ports[0]) == e->tuple.dport && ports[1] == e->tuple.sport;
#else
	return true;
#endif
}

/* e, ours at tw, ended unseen (another timewait socket may be there now). */
static __always_inline void tw_end_stale(void *ctx, u64 tw, struct tt_timewait *e, u64 now)
{
	end_unseen(ctx, e->skaddr, &e->id, &e->tuple, now, TT_EVF_TIMEWAIT_SOCK);
	tw_forget(tw, e);
}

/*
 * Timewait socket tw, ours (e), was removed early: reused, reset, ss -K,
 * its namespace's exit (with timer_cancel: or only moved, see cancel_slot).
 * The memory may be freed soon: record what we need now, and park it by
 * address pair until a new connection claims the pair or user space sweeps
 * it (killed). `mine`: tw's memory still holds it (its substate and timer
 * are its own to read).
 */
static __always_inline void tw_park(void *ctx, u64 tw, struct tt_timewait *e, u64 now, bool mine)
{
#if COLLECT_METRICS
	/*
	 * The kernel has dropped it (ss no longer shows it): it leaves the gauge
	 * now, not when we learn how it ended. Its closing step then moves no
	 * gauge (a cancel that was only a move gives it back: tw_timer_moved).
	 */
	if (!(e->id.flags & TT_SF_OLD_UNCOUNTED)) {
		gauge_add(e->id.state, -1);
		e->id.flags |= TT_SF_OLD_UNCOUNTED;
	}
#endif
	e->killed_ns = now;
	e->killed_jiffies = bpf_jiffies64();
	e->killed_expires_jiffies = mine ? tw_read_expires(tw) : 0;
	e->killed_substate = mine ? tw_read_substate(tw) : e->id.state;
	struct tt_tuple key = e->tuple;
	struct tt_timewait *previous = tw_killed.lookup(&key);
	if (previous) {
		/* An older removed socket with this pair was never claimed. */
		tw_finish(ctx, previous, previous->killed_ns, TT_TW_END_KILLED,
			  previous->killed_substate, previous->killed_expires_jiffies,
			  previous->killed_jiffies);
		killed_delete(&key);
	}
	if (killed_insert(&key, e) != 0) {
		count(TT_C_LOST_KILLED_MAP);
		tw_finish(ctx, e, now, TT_TW_END_KILLED, e->killed_substate,
			  e->killed_expires_jiffies, e->killed_jiffies);
	}
	tw_forget(tw, e);
}

/*
 * A new connection with address pair t: did it reuse a timewait socket
 * removed early, parked by its pair (by timer_cancelled, or with
 * USE_TW_EHASH by check_timewait)? Claimed if so.
 */
static __always_inline void tw_match_reuse(void *ctx, struct tt_tuple *t)
{
	if (parked_none(killed_slot(t)))
		return;
	struct tt_timewait *k = tw_killed.lookup(t);
	if (!k)
		return;
	tw_finish(ctx, k, k->killed_ns, TT_TW_END_REUSED, k->killed_substate,
		  k->killed_expires_jiffies, k->killed_jiffies);
	killed_delete(t);
}

#if USE_TW_EHASH
/*
 * A new connection with address pair t (a child socket, or a connect() past
 * SYN_SENT), on kernels where no program sees a timer cancelled. The kernel
 * killed the timewait socket of the pair as it handed the pair on, an
 * instant ago: found by the pair, unhashed, it ends reused now. Else one
 * check_timewait parked may be claimed. Run by a program of its own on the
 * state change (tw_reuse): in set_state this would take the verifier past
 * its limit.
 */
static __always_inline int tw_reuse_check(void *ctx, struct tt_tuple *t)
{
	u64 *followed = tw_pairs.lookup(t);
	u64 tw = followed ? *followed : 0;
	struct tt_timewait *e = tw ? timewait.lookup(&tw) : NULL;
	if (e && e->tuple.sport == t->sport && e->tuple.dport == t->dport && !tw_hashed(tw)) {
		tw_finish(ctx, e, bpf_ktime_get_ns(), TT_TW_END_REUSED, tw_read_substate(tw),
			  tw_read_expires(tw), bpf_jiffies64());
		tw_forget(tw, e);
		return 0;
	}
	tw_match_reuse(ctx, t);
	return 0;
}
#endif

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

#if USE_TW_EHASH
#define TW_EHASH_DEPTH 4
/*
 * The timewait socket the kernel made for socket sk, closing now with
 * address pair t, or 0 if it made none (tcp_max_tw_buckets reached, an
 * orphan with TCP_LINGER2 < 0, a reset). inet_twsk_hashdance_schedule() puts
 * the timewait socket at the head of sk's bucket of the connection table and
 * unhashes sk before tcp_done() traces the CLOSE; another socket may have
 * been put in front of it since, on another CPU, so a few are looked at.
 * Each is read in one go from the head of its sock_common (TW_HEAD_LEN
 * bytes: its state, hash, ports and IPv4 addresses; the loader checks they
 * lie there) and matched by netns, state, hash and ports (and addresses for
 * IPv4): a timewait socket with all those of sk is sk's.
 */
static __always_inline u64 tw_in_ehash(u64 sk, const struct tt_tuple *t)
{
	u32 hash = 0, mask = 0;
	u64 net = 0, hashinfo = 0, ehash = 0, node = 0;
	if (bpf_probe_read_kernel(&hash, 4, (void *)(sk + OFF_SKC_HASH)) ||
	    bpf_probe_read_kernel(&net, 8, (void *)(sk + OFF_SKC_NET)) ||
	    bpf_probe_read_kernel(&hashinfo, 8, (void *)(net + OFF_NET_TW_HASHINFO)) ||
	    bpf_probe_read_kernel(&ehash, 8, (void *)(hashinfo + OFF_HASHINFO_EHASH)) ||
	    bpf_probe_read_kernel(&mask, 4, (void *)(hashinfo + OFF_HASHINFO_EHASH_MASK)) ||
	    bpf_probe_read_kernel(&node, 8,
				  (void *)(ehash + (u64)(hash & mask) * EHASH_BUCKET_SIZE)))
		return 0;
	u16 dport = htons(t->dport);
#pragma unroll
	for (int i = 0; i < TW_EHASH_DEPTH; i++) {
		if (!node || (node & 1))	/* a nulls marker ends a chain */
			return 0;
		u64 tw = node - OFF_SKC_NULLS_NODE;
		u8 head[TW_HEAD_LEN] = {};
		u64 tw_net = 0;
		if (bpf_probe_read_kernel(head, sizeof(head), (void *)tw) ||
		    bpf_probe_read_kernel(&tw_net, 8, (void *)(tw + OFF_SKC_NET)))
			return 0;
		if (head[OFF_SKC_STATE] == TT_TIME_WAIT && tw_net == net &&
		    *(u32 *)(head + OFF_SKC_HASH) == hash &&
		    *(u16 *)(head + OFF_SKC_DPORT) == dport &&
		    *(u16 *)(head + OFF_SKC_NUM) == t->sport &&
		    (t->family != TT_AF_INET ||
		     (*(u32 *)(head + OFF_SKC_DADDR) == *(u32 *)t->daddr &&
		      *(u32 *)(head + OFF_SKC_RCV_SADDR) == *(u32 *)t->saddr)))
			return tw;
		if (bpf_probe_read_kernel(&node, 8, (void *)node))
			return 0;
	}
	return 0;
}

#if WATCH_OLD_TIMEWAIT
/*
 * A segment reached rx_sk, not ours: if a timewait socket older than
 * tracing, it lives on (the peer's FIN or a duplicate) or a RST killed it.
 * (Its natural end is told by timer_expiring.)
 */
static __always_inline void old_timewait_segment(u64 rx_sk)
{
	u8 state = 0;
	bpf_probe_read_kernel(&state, 1, (void *)(rx_sk + OFF_SKC_STATE));
	if (state != TT_TIME_WAIT)
		return;	/* a full socket's segment */
	struct tt_tuple t = {};
	tw_tuple(rx_sk, &t);
	u8 substate = tw_read_substate(rx_sk);
	old_timewait_news(&t, !tw_hashed(rx_sk) ? TT_CLOSE : substate ? substate : TT_TIME_WAIT);
}
#endif

/*
 * Run by user space (BPF_PROG_TEST_RUN) on the first n addresses of
 * tw_check, timewait sockets it read from tw_pairs: one of ours no longer
 * in the connection table was killed unseen (ss -K, its namespace's exit),
 * or its memory holds another one now. Such addresses stay in tw_check,
 * the others are zeroed; returns how many stay, for sweep_unhashed to park
 * one by one. Only reads: a lifecycle step in this loop would take the
 * verifier past its limit.
 */
static __always_inline int tw_check_unhashed(u64 n)
{
	u32 zero = 0;
	struct tt_tw_check *batch = tw_check.lookup(&zero);
	if (!batch)
		return 0;
	int found = 0;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < TT_TW_CHECK_BATCH; i++) {
		if (i >= n)
			break;
		u64 tw = batch->tw[i];
		struct tt_timewait *e = timewait.lookup(&tw);
		if (!e || (tw_hashed(tw) && tw_has_ports(tw, e)))
			batch->tw[i] = 0;
		else
			found++;
	}
	return found;
}

/*
 * Run by user space (BPF_PROG_TEST_RUN) on a timewait socket check_timewait
 * found: parked as removed early, it leaves the gauge, and is counted reused
 * if a new connection claims its pair within the grace period (killed if
 * not). Returns 1 if parked.
 */
static __always_inline int tw_sweep_unhashed(void *ctx, u64 tw)
{
	struct tt_timewait *e = timewait.lookup(&tw);
	if (!e)
		return 0;
	bool mine = tw_has_ports(tw, e);
	if (mine && tw_hashed(tw))
		return 0;
	tw_park(ctx, tw, e, bpf_ktime_get_ns(), mine);
	return 1;
}
#else
/*
 * The timer of timewait socket tw was cancelled on this CPU just before
 * (cancel_slot): was it only moved? mod_timer re-arms a timer in another
 * bucket of the wheel (the kernel does so when the peer's FIN or a
 * duplicate reaches the socket), which is traced as a cancel. If tw still
 * has the pair, the record timer_cancelled() parked goes back (and the
 * gauge with it), or an older-than-tracing one's news is told. Returns
 * whether it was a move; `cs` is consumed either way.
 */
static __always_inline bool tw_timer_moved(void *ctx, u64 tw, struct tt_cancel_slot *cs, u64 now)
{
	cs->tw = 0;
	struct tt_tuple t = {};
	if (!tw_has_tuple(tw, &t, &cs->tuple))
		return false;	/* a new timewait socket in the memory just freed */
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
		killed_delete(&cs->tuple);
		if (timewait.update(&tw, &alive) == 0) {
			struct tt_timewait *e = timewait.lookup(&tw);
			if (e)
				tw_check_fin(ctx, tw, e, now);
		}
		return true;
	}
	/*
	 * Ours, and no longer parked: a new connection took the pair
	 * (tw_match_reuse) and is closing into TIME_WAIT again, in the memory
	 * just freed: a new timewait socket, not a move.
	 */
	if (cs->followed)
		return false;
#if WATCH_OLD_TIMEWAIT
	if (!k && watching_old_timewait()) {
		/* An old timewait socket lives on (the peer's FIN re-armed it). */
		u8 substate = tw_read_substate(tw);
		old_timewait_news(&t, substate ? substate : TT_TIME_WAIT);
	}
#endif
	return true;
}

static __always_inline int timer_started(void *ctx, u64 timer, u64 function)
{
	if (function != TW_TIMER_HANDLER)
		return 0;
	u64 tw = timer - OFF_TW_TIMER;
	u64 now = bpf_ktime_get_ns();
	u32 zero = 0;

	struct tt_timewait *e = timewait.lookup(&tw);
	struct tt_tw_slot *slot = tw_slot.lookup(&zero);
	if (e && !tw_has_ports(tw, e)) {
		tw_end_stale(ctx, tw, e, now);
		e = NULL;
	}
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
	if (cs && cs->tw == tw && (cs->followed || now - cs->ts_ns < 100000) &&
	    tw_timer_moved(ctx, tw, cs, now))
		return 0;
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
	if (e && !tw_has_ports(tw, e)) {
		/* Not e's timer: whatever ends, e ended before, unseen. */
		tw_end_stale(ctx, tw, e, bpf_ktime_get_ns());
		return 0;
	}
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
	 * another bucket (see cancel_slot): parked either way.
	 */
	u64 now = bpf_ktime_get_ns();
	struct tt_tuple key = e->tuple;
	tw_park(ctx, tw, e, now, true);
	u32 zero = 0;
	struct tt_cancel_slot *cs = cancel_slot.lookup(&zero);
	if (cs) {
		cs->tw = tw;
		cs->ts_ns = now;
		cs->tuple = key;
		cs->followed = 1;
	}
	return 0;
}

#endif /* USE_TW_EHASH */

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
		tw_forget(tw, e);
		return 0;
	}
#if USE_TW_EHASH
#if WATCH_OLD_TIMEWAIT
	if (watching_old_timewait()) {
		/* One older than tracing goes. */
		struct tt_tuple t = {};
		tw_tuple(tw, &t);
		old_timewait_news(&t, TT_CLOSE);
	}
#endif
	return 0;
#else
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
		killed_delete(&cs->tuple);
	}
	cs->tw = 0;
	return 0;
#endif
}

/* A segment processed by a timewait socket is freed with rx_sk = it. */
static __always_inline int skb_freed(void *ctx, u64 rx_sk)
{
	if (!rx_sk)
		return 0;
	struct tt_timewait *e = timewait.lookup(&rx_sk);
	if (!e) {
#if USE_TW_EHASH && WATCH_OLD_TIMEWAIT
		if (watching_old_timewait())
			old_timewait_segment(rx_sk);
#endif
		return 0;
	}
	u64 now = bpf_ktime_get_ns();
	if (!tw_has_ports(rx_sk, e)) {
		tw_end_stale(ctx, rx_sk, e, now);
		return 0;
	}
#if USE_TW_EHASH
	/*
	 * A RST killed it (tcp_timewait_state_process), unhashed, before the
	 * segment was freed; a SYN that reuses the pair goes on to the listener.
	 */
	if (!tw_hashed(rx_sk)) {
		tw_finish(ctx, e, now, TT_TW_END_KILLED, tw_read_substate(rx_sk),
			  tw_read_expires(rx_sk), bpf_jiffies64());
		tw_forget(rx_sk, e);
		return 0;
	}
#endif
	tw_check_fin(ctx, rx_sk, e, now);
	return 0;
}

/*
 * Run by user space (BPF_PROG_TEST_RUN), never attached: finishes as
 * "killed" the cancelled timewait socket whose address pair user space put
 * in sweep_request, once no new connection claimed it within the grace
 * period. One per run: such sockets are rare, and a loop over many would
 * exceed what the verifier accepts.
 */
static __always_inline int tw_sweep_killed(void *ctx)
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
	killed_delete(&key);
	return 1;
}
#if CHECK_TW_FIN
/*
 * Run by user space (BPF_PROG_TEST_RUN) every second for each socket in
 * tw_fin_wait2, whose address is the run's argument: a timewait socket of
 * ours still in FIN_WAIT2 for all we saw. If the peer's FIN has come, it
 * moves to TIME_WAIT as of then. Returns 1 if so.
 */
static __always_inline int tw_sweep_fin_wait2(void *ctx, u64 tw)
{
	u64 now = bpf_ktime_get_ns();
	struct tt_timewait *e = timewait.lookup(&tw);
	if (e && e->id.state == TT_FIN_WAIT2) {
		if (!tw_has_ports(tw, e)) {
			tw_end_stale(ctx, tw, e, now);
			tw_fin_wait2.delete(&tw);
			return 0;
		}
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
static __always_inline int tw_sweep_stale(void *ctx, u64 tw)
{
	struct tt_timewait *e = timewait.lookup(&tw);
	if (!e)
		return 0;
	tw_end_stale(ctx, tw, e, bpf_ktime_get_ns());
	return 1;
}
#endif /* HAVE_TIMEWAIT */
