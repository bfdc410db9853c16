/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * events.h - the event of one step, to user space (EMIT_EVENTS): through the
 * BPF ring buffer where the kernel has one, else a perf buffer.
 */

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
