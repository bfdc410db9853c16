/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * tcptrace.h - definitions shared by the BPF program (tcptrace.bpf.c) and
 * user space. The Python side mirrors `struct tt_event` in
 * tcptrace_ebpf/events.py (a test checks the two layouts agree); map keys and
 * values are read through the types BCC derives from this file.
 *
 * Types are the kernel's u8..u64, which BCC maps to ctypes.
 * Units are in field names: *_ns are nanoseconds of CLOCK_MONOTONIC
 * (bpf_ktime_get_ns), *_jiffies are kernel jiffies.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

#define TT_AF_INET 2
#define TT_AF_INET6 10
#define TT_IPPROTO_TCP 6
#define TT_COMM_LEN 16

/* TCP states, numbered as in include/net/tcp_states.h. */
enum tt_tcp_state {
	TT_ESTABLISHED = 1,
	TT_SYN_SENT = 2,
	TT_SYN_RECV = 3,
	TT_FIN_WAIT1 = 4,
	TT_FIN_WAIT2 = 5,
	TT_TIME_WAIT = 6,
	TT_CLOSE = 7,
	TT_CLOSE_WAIT = 8,
	TT_LAST_ACK = 9,
	TT_LISTEN = 10,
	TT_CLOSING = 11,
	TT_NEW_SYN_RECV = 12,
};
/* Arrays indexed by state have this many slots (states are < 16). */
#define TT_STATE_SLOTS 16

enum tt_role {
	TT_ROLE_UNKNOWN = 0,	/* first seen mid-life, before tracing started */
	TT_ROLE_CLIENT = 1,	/* active open: connect() */
	TT_ROLE_SERVER = 2,	/* child of a listener */
	TT_ROLE_LISTENER = 3,
};
/* Metric arrays keyed by role only have client, server and unknown rows. */
#define TT_METRIC_ROLES 3

/* How the owner (pid, comm, cgroup) of a socket was learned. */
enum tt_owner_source {
	TT_OWNER_UNKNOWN = 0,
	TT_OWNER_CONNECT = 1,	/* the process that called connect() */
	TT_OWNER_LISTEN = 2,	/* the process that called listen() */
	TT_OWNER_LISTENER = 3,	/* the owner of the listener that accepted it */
	TT_OWNER_CLOSER = 4,	/* the process that called close()/shutdown() on it */
};

/* How a connection ended. */
enum tt_close {
	TT_CLOSE_NONE = 0,
	TT_CLOSE_ACTIVE = 1,		/* we sent FIN first */
	TT_CLOSE_PASSIVE = 2,		/* the peer's FIN came first (CLOSE_WAIT) */
	TT_CLOSE_SIMULTANEOUS = 3,	/* both FINs crossed (CLOSING) */
	TT_CLOSE_RESET_SENT = 4,
	TT_CLOSE_RESET_RECEIVED = 5,
	TT_CLOSE_REFUSED = 6,		/* our SYN was answered by RST */
	TT_CLOSE_TIMEOUT = 7,		/* the peer stopped answering (SYN or data) */
	TT_CLOSE_CONNECT_FAILED = 8,	/* connect() failed before sending a SYN */
	TT_CLOSE_LISTENER_CLOSED = 9,
};
#define TT_CLOSE_SLOTS 10

/* How TIME_WAIT (or a timewait socket still in FIN_WAIT2) ended. */
enum tt_tw_end {
	TT_TW_END_NONE = 0,
	TT_TW_END_EXPIRED = 1,	/* its timer fired */
	TT_TW_END_REUSED = 2,	/* a new connection took the same address pair */
	TT_TW_END_KILLED = 3,	/* removed early otherwise: RST, ss -K, netns gone */
};
#define TT_TW_END_SLOTS 4

/* Flags carried by events (struct tt_event.flags). */
#define TT_EVF_DURATION_KNOWN	(1u << 0)	/* duration_ns is the time spent in old_state */
#define TT_EVF_PREEXISTING	(1u << 1)	/* socket existed before tracing started */
#define TT_EVF_LOST_BEFORE	(1u << 2)	/* an earlier event of this lifecycle was lost */
#define TT_EVF_UNTRACKED	(1u << 3)	/* socket map full: no per-socket state */
#define TT_EVF_RESET_SENT	(1u << 4)	/* we sent a RST on this socket */
#define TT_EVF_RESET_RECEIVED	(1u << 5)	/* we received a RST on this socket */
#define TT_EVF_LAST		(1u << 6)	/* the lifecycle ended with this event */
#define TT_EVF_INFERRED_TIME	(1u << 7)	/* ts recovered from the timewait timer, not seen live */
#define TT_EVF_TIMEWAIT_SOCK	(1u << 8)	/* the kernel's timewait socket, not the full socket */
#define TT_EVF_NO_TIME_WAIT	(1u << 9)	/* closed actively but the kernel created no timewait socket */
#define TT_EVF_END_UNSEEN	(1u << 10)	/* it ended unseen (the kernel skipped our program): */
						/* this event closes it when we noticed */
#define TT_EVF_NO_SYN		(1u << 11)	/* SYN_SENT -> CLOSE before any SYN left: connect() failed */

/* One TCP state change, sent to user space (trace and lifecycles modes). */
struct tt_event {
	u64 ts_ns;		/* when the change happened */
	u64 sock_id;		/* stable id of this socket's lifecycle (0: untracked) */
	u64 skaddr;		/* kernel address of the full socket (reused after free) */
	u64 duration_ns;	/* time spent in old_state (if TT_EVF_DURATION_KNOWN) */
	u32 pid;		/* owner's tgid, 0 if unknown */
	u32 flags;		/* TT_EVF_* */
	u8 saddr[16];		/* local address (IPv4 in the first 4 bytes) */
	u8 daddr[16];		/* remote address */
	u16 sport;		/* local port */
	u16 dport;		/* remote port */
	u16 family;		/* TT_AF_INET or TT_AF_INET6 */
	u16 seq;		/* position of this event in its lifecycle: 0, 1, ... */
	u8 old_state;
	u8 new_state;
	u8 role;		/* enum tt_role */
	u8 owner_source;	/* enum tt_owner_source */
	u8 tw_end;		/* enum tt_tw_end, on the event that ends a timewait socket */
	u8 pad;
	u16 syn_retrans;	/* SYN retransmissions seen */
	char comm[TT_COMM_LEN];	/* owner's command */
	u64 cgroup_id;		/* owner's cgroup v2 id (inode of its directory), 0 if unknown */
};

/* An address pair, as seen from the socket's own side. */
struct tt_tuple {
	u32 netns;		/* network namespace inode number (0 if unknown) */
	u16 family;
	u16 sport;
	u16 dport;
	u16 pad;
	u8 saddr[16];
	u8 daddr[16];
};

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

/* In the `adopted` map's value: news of a timewait socket older than tracing. */
#define TT_ADOPT_OLD_TIMEWAIT 0x80

/* Indexes of the `counters` map: self-metrics and lost events by cause. */
enum tt_counter {
	TT_C_EVENTS = 0,		/* TCP state changes seen */
	TT_C_LOST_RINGBUF = 1,		/* events dropped: ring/perf buffer full */
	TT_C_LOST_SOCKET_MAP = 2,	/* sockets not tracked: socket map full */
	TT_C_LOST_TIMEWAIT_MAP = 3,	/* timewait sockets not tracked: map full */
	TT_C_LOST_KILLED_MAP = 4,	/* cancelled timewait sockets not classified: map full */
	TT_C_LOST_LISTENER_MAP = 5,	/* listeners whose owner was not recorded: map full */
	TT_C_LOST_CLOSE_WAIT_MAP = 6,	/* CLOSE_WAIT sockets not tracked: map full */
	TT_C_LOST_ADOPTED_MAP = 7,	/* pre-existing sockets not reported: map full */
	TT_C_TW_SKIPPED = 8,		/* active closes that got no timewait socket */
	TT_C_SOCKETS_BORN = 9,		/* lifecycles started (tracked or not) */
	TT_C_LOST_DEST_MAP = 10,	/* client sockets not counted per destination: map full */
	TT_C_MISSED_TRANSITION = 11,	/* a change's old state was not the one we recorded */
	TT_C_MISSED_END = 12,		/* lifecycles whose end we never saw */
	TT_C_LOST_FIN_WAIT2_MAP = 13,	/* timewait sockets in FIN_WAIT2 not checked: map full */
	TT_C_SYN_RETRANS = 14,		/* SYNs sent again by connecting sockets we follow */
};
#define TT_COUNTER_SLOTS 16

#endif /* TCPTRACE_H */
