/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * helpers.h - small helpers every part uses: the drop counters, the
 * counted inserts and deletes of tw_killed and pending_close (`parked`),
 * lifecycle ids, reading the running kernel's objects, the filters, a
 * socket's owner.
 */

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

static __always_inline void parked_add(u32 which, s64 delta)
{
	s64 *value = parked.lookup(&which);
	if (value)
		__sync_fetch_and_add(value, delta);
}

/* Whether no entry of tw_killed or pending_close can match (which: its slot). */
static __always_inline bool parked_none(u32 which)
{
	s64 *value = parked.lookup(&which);
	return value && *value == 0;
}

/*
 * The slot of an address pair in `parked`. Not symmetric in the ports: the
 * client's end of a loopback connection must not share the slot of the
 * server's end, whose timewait socket a connection on the pair reuses.
 */
static __always_inline u32 killed_slot(const struct tt_tuple *t)
{
	return ((u32)t->sport * 31 + t->dport) & (TT_PARKED_SLOTS - 1);
}

static __always_inline int killed_insert(struct tt_tuple *key, struct tt_timewait *e)
{
	int err = tw_killed.update(key, e);
	if (err == 0)
		parked_add(killed_slot(key), 1);
	return err;
}

static __always_inline void killed_delete(struct tt_tuple *key)
{
	if (tw_killed.delete(key) == 0)
		parked_add(killed_slot(key), -1);
}

static __always_inline int pending_close_insert(u64 *key, struct tt_pending_close *held)
{
	int err = pending_close.update(key, held);
	if (err == 0)
		parked_add(TT_PARKED_CLOSES, 1);
	return err;
}

static __always_inline void pending_close_delete(u64 *key)
{
	if (pending_close.delete(key) == 0)
		parked_add(TT_PARKED_CLOSES, -1);
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

/* A u32 field of sk, at offset `off`; `typed` as for read_netns_of(). */
static __always_inline u32 read_sock_u32(u64 sk, bool typed, u32 off)
{
#if USE_TP_BTF
	if (typed)
		return BTF_LOAD(u32, sk, off);
#endif
	u32 value = 0;
	bpf_probe_read_kernel(&value, sizeof(value), (void *)(sk + off));
	return value;
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
