/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * socket_state.h - the per-socket state machine: each full socket followed
 * from its first state change to its close (or its timewait socket, see
 * time_wait.h), with its owner, its role and the RSTs and SYN
 * retransmissions that tell how its connection ended.
 */

/* -------------------------------------------------------- address pairs -- */

/*
 * The address pair of a tracepoint record with inet_sock_set_state's address
 * fields (tcp_retransmit_skb's has them too): a macro, since each
 * tracepoint's record is a struct of its own.
 */
#define TUPLE_FROM_RECORD(t, rec)                                          \
	do {                                                               \
		(t)->family = (rec)->family;                               \
		(t)->sport = (rec)->sport;                                 \
		(t)->dport = (rec)->dport;                                 \
		if ((rec)->family == TT_AF_INET) {                         \
			__builtin_memcpy((t)->saddr, (rec)->saddr, 4);     \
			__builtin_memcpy((t)->daddr, (rec)->daddr, 4);     \
		} else {                                                   \
			__builtin_memcpy((t)->saddr, (rec)->saddr_v6, 16); \
			__builtin_memcpy((t)->daddr, (rec)->daddr_v6, 16); \
		}                                                          \
	} while (0)

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
#endif

#if USE_TP_BTF
/* The same from a BTF-typed tcp_sock (see BTF_LOAD): every field a plain load. */
static __always_inline void tuple_from_btf_sk(u64 sk, struct tt_tuple *t)
{
	t->family = BTF_LOAD(u16, sk, OFF_SKC_FAMILY);
	t->sport = ntohs(BTF_LOAD(u16, sk, OFF_INET_SPORT));
	t->dport = ntohs(BTF_LOAD(u16, sk, OFF_SKC_DPORT));
	u32 *saddr = (u32 *)t->saddr, *daddr = (u32 *)t->daddr;
	if (t->family == TT_AF_INET) {
		saddr[0] = BTF_LOAD(u32, sk, OFF_INET_SADDR);
		daddr[0] = BTF_LOAD(u32, sk, OFF_SKC_DADDR);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			saddr[i] = BTF_LOAD(u32, sk, OFF_SKC_V6_RCV_SADDR + 4 * i);
			daddr[i] = BTF_LOAD(u32, sk, OFF_SKC_V6_DADDR + 4 * i);
		}
	}
}
#endif

/* ------------------------------------------------------------ set_state -- */

/*
 * Before 6.13 an accepted child changes LISTEN -> SYN_RECV as a copy of its
 * listener (inet_csk_clone_lock() sets the state before the ports and
 * tcp_v4/v6_syn_recv_sock() the addresses): no peer, and a wildcard local
 * address. Its SYN_RECV event is held (id->pair_pending) until the next
 * change, which has the full pair; then it is told, as of when it happened,
 * with that pair, and the pair is checked against cancelled timewait
 * sockets (the reuse match needs the peer).
 */
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
	if (!(id->flags & TT_SF_PREEXISTING) && id->role != TT_ROLE_LISTENER) {
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
 * A socket older than tracing (or missed for a full map), first seen
 * leaving `old`: user space counts it from its listing until told the
 * program has it, here once the program follows it (or saw it close).
 */
static __always_inline void tell_adopted(const struct tt_ident *id, struct tt_tuple *t, u8 old)
{
#if COLLECT_METRICS
	if (!(id->flags & TT_SF_PREEXISTING))
		return;
	u8 state = old;
	if (adopted.update(t, &state) != 0)
		count(TT_C_LOST_ADOPTED_MAP);
#endif
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
	u32 srtt_us = read_sock_u32(sk, typed, OFF_TCP_SRTT_US);
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
	return read_sock_u32(sk, typed, OFF_TCP_SEGS_OUT) != 0;
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
	u32 total = read_sock_u32(sk, typed, OFF_TCP_TOTAL_RETRANS);
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
		total = read_sock_u32(sk, typed, OFF_TCP_TOTAL_RETRANS);
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
 * A change we never saw (the kernel skipped the program on it: see
 * end_unseen): carry on from `state`, the kernel's. When it began is not
 * known. The gauge follows: it counted the socket in the state we recorded.
 * So does the CLOSE_WAIT map: a socket it has that left CLOSE_WAIT unseen
 * would stay listed there after its end (step() deletes on leaving it).
 */
static __always_inline void catch_up(u64 sk, struct tt_ident *id, u8 state)
{
	count(TT_C_MISSED_TRANSITION);
	id->flags |= TT_SF_LOST;
#if COLLECT_METRICS
	if (!(id->flags & TT_SF_OLD_UNCOUNTED)) {
		gauge_add(id->state, -1);
		gauge_add(state, 1);
	}
	if (id->state == TT_CLOSE_WAIT)
		close_wait.delete(&sk);
#endif
	id->state = state;
	id->state_ns = 0;
}

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
#if HAVE_TIMEWAIT && USE_TW_EHASH
	if (new == TT_CLOSE && (old == TT_FIN_WAIT2 || old == TT_CLOSING)) {
		tw = tw_in_ehash(key, &t);
		if (tw)
			tw_substate = tw_read_substate(tw);
	}
#elif HAVE_TIMEWAIT
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
		struct tt_pending_close *held =
			parked_none(TT_PARKED_CLOSES) ? NULL : pending_close.lookup(&key);
		if (held) {
			finish_pending_close(args, key, held);
			pending_close_delete(&key);
		}
		struct tt_sock fresh = {};
		fresh.tuple.netns = read_netns_of(sk, typed);
		if (!first_sight(&fresh, &t, old, new, now))
			return 0;
		fresh.tuple = t;
		if (old == TT_LISTEN && new == TT_SYN_RECV && !t.dport)
			fresh.id.pair_pending = 1;
		/*
		 * Born and gone in one step, or first seen on its way out. (Into
		 * a timewait socket: followed below, like any, so it is counted.)
		 */
		if (new == TT_CLOSE && !tw) {
			u32 once = old == TT_SYN_SENT && !syn_sent(sk, typed) ? TT_EVF_NO_SYN : 0;
			tell_adopted(&fresh.id, &t, old);
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
		tell_adopted(&fresh.id, &t, old);
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
	if (id->state != old)
		catch_up(key, id, old);

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
#if !USE_TW_EHASH
	/*
	 * A new connection on an address pair whose timewait socket was just
	 * cancelled? (With USE_TW_EHASH, a program of its own asks: tw_reuse.)
	 */
	if ((old == TT_LISTEN && new == TT_SYN_RECV && t.dport) || (old == TT_SYN_SENT && t.sport != 0))
		tw_match_reuse(args, &t);
#endif

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
			tw_end_stale(args, tw, stale, now);
		}
		/* In substate FIN_WAIT2 it still waits for the peer's FIN: no step yet. */
		if (tw_substate != TT_FIN_WAIT2)
			step(args, key, &e.id, &t, TT_TIME_WAIT, now, 0, TT_TW_END_NONE);
		if (tw_follow(tw, &e) != 0) {
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
		if (pending_close_insert(&key, &held) == 0) {
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

/* --------------------------------------------------------------- sweeps -- */

/*
 * Run by user space (BPF_PROG_TEST_RUN): a socket we follow (full or
 * timewait) that sock_diag no longer lists, its end unseen (a lost event):
 * closed now, flagged, so the gauge counts what exists. Only if it is still
 * the lifecycle user space found gone (its memory may hold a new one since).
 */
static __always_inline int socket_sweep_gone(void *ctx, u64 sk)
{
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
		tw_end_stale(ctx, sk, e, bpf_ktime_get_ns());
		return 1;
	}
#endif
	return 0;
}

/*
 * Run by user space (BPF_PROG_TEST_RUN): a socket we follow that sock_diag
 * lists in another state than the one we recorded, which began before the
 * listing did: the kernel skipped the program on a change of it, and the
 * next one we see may be far off (a CLOSE_WAIT leak's never comes). Carry
 * on from the listed state now, as that change would: the gauge and the
 * CLOSE_WAIT map have it where it is. Only if it is still the lifecycle,
 * state and state start user space read (a change seen since sets another).
 * A change run on another CPU in the instant between this check and the
 * move could still interleave with it; the socket has sat unchanged for
 * over a second, far less likely than the skip this repairs.
 */
static __always_inline int socket_sweep_behind(u64 sk)
{
	u32 zero = 0;
	struct tt_behind *want = sweep_request_behind.lookup(&zero);
	if (!want)
		return 0;
	struct tt_sock *s = socks.lookup(&sk);
	if (!s || s->id.sock_id != want->sock_id || s->id.state != want->recorded ||
	    s->id.state_ns != want->state_ns || (s->id.flags & TT_SF_OLD_UNCOUNTED))
		return 0;
	catch_up(sk, &s->id, want->listed);
#if COLLECT_METRICS
	/* Its age counts from now: when it began is not known. */
	if (want->listed == TT_CLOSE_WAIT)
		close_wait_enter(sk, &s->id, &s->tuple, bpf_ktime_get_ns());
#endif
	return 1;
}

/*
 * Run by user space (BPF_PROG_TEST_RUN): a close held in pending_close for
 * longer than any RST of an abortive close takes to follow: it had none.
 */
static __always_inline int socket_sweep_pending_close(void *ctx, u64 sk)
{
	struct tt_pending_close *held = pending_close.lookup(&sk);
	if (!held)
		return 0;
	finish_pending_close(ctx, sk, held);
	pending_close_delete(&sk);
	return 1;
}

/* --------------------------------------------------- resets and retries -- */

#if HAVE_RESET_RECEIVED
static __always_inline void reset_received(u64 sk)
{
	struct tt_sock *s = socks.lookup(&sk);
	if (s)
		s->id.last_reset = TT_RESET_RECEIVED;
}
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
		pending_close_delete(&sk);
		return;
	}
	struct tt_sock *s = socks.lookup(&sk);
	if (s)
		s->id.last_reset = TT_RESET_SENT;
}
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
#endif
