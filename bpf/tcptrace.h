/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * tcptrace.h - the BPF program's own structures (tcptrace.bpf.c). What user
 * space and the program must agree on (flags, enums, counter indexes, slot
 * counts, struct tt_event and tt_tuple) is in tcptrace_interface.h, generated
 * from tcptrace_ebpf/kernel/interface.py; map keys and values are read
 * through the layouts the compiler describes.
 *
 * Types are the kernel's u8..u64, which BCC maps to ctypes.
 * Units are in field names: *_ns are nanoseconds of CLOCK_MONOTONIC
 * (bpf_ktime_get_ns), *_jiffies are kernel jiffies.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

#include "tcptrace_interface.h"

/* Who a lifecycle is and where it stands; kept per socket in the kernel. */
struct tt_ident {
	u64 sock_id;
	u64 birth_ns;		/* 0: born before tracing started */
	u64 state_ns;		/* when the current state began; 0: unknown */
	u32 pid;		/* owner's tgid; 0: unknown */
	u16 seq;		/* events of this lifecycle so far */
	u16 syn_retrans;
	u8 state;
	u8 role;
	u8 owner_source;
	u8 flags;		/* TT_SF_* */
	u8 last_reset;	/* 0, TT_RESET_SENT or TT_RESET_RECEIVED */
	u8 port_slot;		/* row of the optional per-port metric label */
	u8 pair_pending;	/* accepted child seen before its peer was set: SYN_RECV not told yet */
	u8 pad;
	char comm[TT_COMM_LEN];
	u64 cgroup_id;		/* owner's cgroup v2 id; 0: unknown */
};

/* struct tt_ident.flags */
#define TT_SF_PREEXISTING	(1u << 0)	/* born before tracing started */
#define TT_SF_OLD_UNCOUNTED	(1u << 1)	/* current state not in the per-state gauge yet */
#define TT_SF_LOST		(1u << 2)	/* one of its events was lost */
#define TT_SF_SAW_FIN_WAIT1	(1u << 3)	/* we closed first (FIN_WAIT1/2, TIME_WAIT came first) */
#define TT_SF_SAW_CLOSE_WAIT	(1u << 4)	/* the peer closed first (CLOSE_WAIT, LAST_ACK came first) */
#define TT_SF_SAW_CLOSING	(1u << 5)
#define TT_SF_FINISHED		(1u << 6)	/* connection accounted as closed */
#define TT_SF_DEST_COUNTED	(1u << 7)	/* counted in dest_ports until its end */

#define TT_RESET_SENT 1
#define TT_RESET_RECEIVED 2

/* Per full socket, keyed by its kernel address. */
struct tt_sock {
	struct tt_ident id;
	struct tt_tuple tuple;	/* as of its last state change (netns included) */
};

/*
 * Per timewait socket, keyed by its kernel address while its timer runs;
 * keyed by its tuple (map tw_killed) once the timer was cancelled, until we
 * know whether a new connection reused the address pair.
 */
struct tt_timewait {
	struct tt_ident id;
	struct tt_tuple tuple;
	u64 skaddr;		/* the full socket it replaced */
	u64 created_ns;
	u64 killed_ns;	/* when its timer was cancelled */
	u64 killed_jiffies;	/* jiffies then */
	u64 killed_expires_jiffies;	/* the timer's expiry then */
	u8 killed_substate;	/* its substate then */
	u8 pad[7];
};

/*
 * A followed socket sock_diag lists in another state than the one we
 * recorded, as user space read it (sweep_behind: see socket_sweep_behind()).
 */
struct tt_behind {
	u64 sock_id;
	u64 state_ns;		/* when the recorded state began, as read */
	u8 recorded;		/* the state we recorded */
	u8 listed;		/* the state sock_diag lists */
	u8 pad[6];
};

/* A remote address:port, for local ports in use towards it (dest_ports). */
struct tt_dest {
	u32 netns;
	u16 family;
	u16 dport;
	u8 daddr[16];
};

/* Owner of the listeners on one port of one network namespace. */
struct tt_listener_key {
	u32 netns;
	u16 port;
	u16 pad;
};
struct tt_listener {
	u32 pid;
	u32 count;		/* listening sockets on this key */
	u8 ambiguous;		/* owned by more than one process: children get no owner */
	u8 pad[7];
	char comm[TT_COMM_LEN];
	u64 cgroup_id;
};

/* A socket in CLOSE_WAIT (serve mode), keyed by its kernel address. */
struct tt_close_wait {
	struct tt_tuple tuple;
	u64 since_ns;
	u64 sock_id;
	u32 pid;
	u8 owner_source;
	u8 pad[3];
	char comm[TT_COMM_LEN];
	u64 cgroup_id;
};

#endif /* TCPTRACE_H */
