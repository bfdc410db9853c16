/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * lifecycle.h - one step of a socket's lifecycle, full or timewait socket
 * alike: its event, its metrics, how its connection closed; and the ends we
 * learn of late (unseen, or held for the RST of an abortive close).
 */

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
		observe(TT_HIST_STATE, old & (TT_STATE_SLOTS - 1), in_old_ns);
		if (old == TT_CLOSE_WAIT)
			observe(TT_HIST_CLOSE_WAIT, 0, in_old_ns);
		if (tw_end != TT_TW_END_NONE && old == TT_TIME_WAIT)
			observe(TT_HIST_TIME_WAIT, tw_end, in_old_ns);
	}

	u32 role_row = metric_role(id->role) * PORT_SLOTS + (id->port_slot % PORT_SLOTS);
	if (new == TT_ESTABLISHED && (old == TT_SYN_SENT || old == TT_SYN_RECV) && id->state_ns)
		observe(TT_HIST_HANDSHAKE, role_row, in_old_ns);
	if (finishes) {
		u32 close = close_kind(id, old, t->sport, evflags);
		u32 cindex = role_row * TT_CLOSE_SLOTS + close;
		value = connections_closed_total.lookup(&cindex);
		if (value)
			*value += 1;
		if (id->birth_ns && ts >= id->birth_ns)
			observe(TT_HIST_CONNECTION, role_row, ts - id->birth_ns);
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
