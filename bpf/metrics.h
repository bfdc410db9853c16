/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * metrics.h - what the program aggregates itself when it collects metrics
 * (COLLECT_METRICS): the per-state gauge, sockets in CLOSE_WAIT, local ports
 * in use per destination. The histograms are in histograms.h.
 */

#if COLLECT_METRICS
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
