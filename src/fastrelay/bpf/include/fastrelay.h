/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * fastrelay.h - the ONLY definition of what crosses the kernel/userspace boundary:
 * map keys and values, ring-buffer records, counter indices and payload tags.
 *
 * The Python loader (fastrelay.kernel) checks its ctypes mirrors against the BTF of
 * every compiled object at load time and reads enum values from BTF, so a change here
 * that Python does not follow fails loudly instead of corrupting data.
 */
#ifndef FASTRELAY_H
#define FASTRELAY_H

#include <linux/types.h>

#define FR_MAX_SUBSCRIBERS 1024      /* per fan-out set */
#define FR_PROBE_SLOTS 256           /* probe receivers (subscriber interfaces) */
#define FR_PROBE_TS_SLOTS 65536      /* publisher timestamps kept, indexed by seq */
#define FR_HIST_BUCKETS 512          /* log-linear delay histogram, see fr_hist_bucket() */
enum fr_tag_magic {
	FR_TAG_MAGIC = 0x46524c42,   /* "FRLB", little endian in the payload */
};

/*
 * Keep a type's BTF in the object even when only the stack or constants use it
 * (ring-buffer records, counter enums), so userspace can check and read it.
 */
#define FR_EXPORT_BTF(type, name) type *fr_btf_##name __attribute__((unused))

/* ---------------------------------------------------------------- payload tag */
/* First 16 bytes of every lab/benchmark UDP payload (little endian). */
struct fr_tag {
	__u32 magic;                 /* FR_TAG_MAGIC */
	__u32 stream;
	__u64 seq;
};

/* ---------------------------------------------------------------- UDP fan-out */
/* fr_fanout_cfg[0]. Addresses in network order, IPv4 in the first 4 bytes. */
struct fr_fanout_config {
	__be16 port;                 /* relay UDP port; 0 = disabled (everything passes) */
	__u8 family;                 /* AF_INET or AF_INET6: the relay's (and subscribers') family */
	__u8 src_filter;             /* 1 = fan out only packets from src_addr */
	__u32 max_len;               /* largest L3 packet forwarded in the kernel; larger ones go up */
	__u8 src_addr[16];
	__u8 dst_addr[16];           /* the listen address (unless dst_any) */
	__u8 dst_any;                /* wildcard listen address: daddr must be in fr_fanout_local */
	__u8 pad[3];
	__u32 csum_v6_flags;         /* BPF_F_IPV6 where the kernel has it, else 0 */
};

/* fr_fanout_local: the relay's own addresses, for a wildcard listen address */
struct fr_addr {
	__u8 bytes[16];
};

/* One subscriber, as the egress rewrite needs it. Addresses and ports in network order. */
struct fr_fanout_sub {
	__u32 id;                    /* stable subscriber id, carried by fr_fanout_event */
	__u32 ifindex;               /* relay-side egress interface */
	__u8 dst_mac[6];
	__u8 src_mac[6];
	__be16 dst_port;
	__be16 src_port;
	__u8 dst_ip[16];
	__u8 src_ip[16];
};

/*
 * fr_fanout_sets[0..1]: double-buffered subscriber sets. Userspace writes the inactive
 * set whole, flips fr_fanout_active[0], then waits for an RCU grace period (an update of
 * the map-in-map fr_fanout_sync returns only after every running program finished), so
 * no packet still reads a set when it is rewritten. A packet reads the active index once.
 */
struct fr_fanout_set {
	__u32 count;
	__u32 pad;
	struct fr_fanout_sub subs[FR_MAX_SUBSCRIBERS];
};

/* One record per copy sent by the kernel (ring buffer fr_fanout_events). */
struct fr_fanout_event {
	__u32 sub_id;
	__u32 bytes;                 /* L3 length of the copy */
};

/* Indices of the per-CPU counter array fr_fanout_stats. */
enum fr_fanout_counter {
	FR_FC_RX = 0,                /* packets addressed to the relay port */
	FR_FC_FANNED,                /* of those, fanned out in the kernel */
	FR_FC_COPIES,                /* copies sent (clones + final redirect) */
	FR_FC_PASS_GSO,              /* GRO/GSO-merged skb: passed up to userspace */
	FR_FC_PASS_OVERSIZE,         /* larger than max_len: passed up to userspace */
	FR_FC_PASS_FRAGMENT,         /* IP fragment: passed up for reassembly */
	FR_FC_PASS_IRREGULAR,        /* trailing bytes beyond UDP/IP length: passed up, the stack trims */
	FR_FC_DROP_MALFORMED,        /* truncated or inconsistent lengths */
	FR_FC_DROP_SOURCE,           /* source not allowed */
	FR_FC_DROP_NO_SUBS,          /* nobody subscribed */
	FR_FC_REDIRECT_ERR,          /* rewrite or clone/redirect failed */
	FR_FC_RINGBUF_FULL,          /* copy sent but its record was lost */
	FR_FC_MAX,
};

/* ---------------------------------------------------------------- lab probes */
/* fr_probe_cfg[0] */
struct fr_probe_config {
	__u16 tag_offset;            /* offset of struct fr_tag in the UDP payload */
	__u8 sink;                   /* 1 = drop tagged packets after measuring (benchmark sink) */
	__u8 pad;
	__u16 scan;                  /* > 0: the tag is the first one found in this many payload bytes
	                              * from tag_offset (tags inside QUIC frames move around) */
	__u16 pad2;
};

#define FR_PROBE_SCAN_MAX 1536        /* bytes a scanning probe searches at most */

/* fr_probe_ts[seq % FR_PROBE_TS_SLOTS]: when the publisher sent seq */
struct fr_probe_ts {
	__u64 seq;
	__u64 ts_ns;
};

/* fr_probe_slots: key = receiver MAC (6 bytes, zero padded), value = histogram slot */
struct fr_probe_mac {
	__u8 addr[6];
	__u16 pad;
};

/* fr_probe_hist[slot], per CPU */
struct fr_probe_hist {
	__u64 packets;               /* tagged packets seen */
	__u64 bytes;                 /* their L3 bytes */
	__u64 matched;               /* with a publisher timestamp (delay recorded) */
	__u64 max_ns;
	__u64 buckets[FR_HIST_BUCKETS];
};

/* ---------------------------------------------------------------- lab loss */
/* fr_drop_cfg[0] */
struct fr_drop_config {
	__u32 threshold;             /* drop when bpf_get_prandom_u32() < threshold */
	__u32 pad;
};

enum fr_drop_counter {
	FR_DC_SEEN = 0,              /* data packets (neighbour discovery passes uncounted) */
	FR_DC_DROPPED,
	FR_DC_MAX,
};

/* ---------------------------------------------------------------- MoQT kernel fast path */
/*
 * Publisher connection A (upstream) and subscriber connections B_i (downstream) are QUIC
 * connections in plaintext mode (identity packet protection, 16-byte zero tag). The
 * ingress program parses A's 1-RTT packets and clones them, one per subscriber of each
 * track present; the egress program turns each clone into a packet of B_i (its addresses,
 * connection id, packet number, stream ids and track alias) and reports it, and renumbers
 * the packets userspace itself sends on B_i from the same counter.
 */
/* Sizes both sides need: an enum, so they reach Python through BTF (checked at load). */
enum fr_moq_limits {
	FR_MOQ_CID_LEN = 8,            /* connection id length (aioquic's default) */
	FR_MOQ_TAG_LEN = 16,           /* identity AEAD: 16 zero bytes */
	FR_MOQ_BUF = 2048,             /* scratch buffers; power of two (indices are masked) */
	FR_MOQ_MAX_PAYLOAD = 1472,     /* largest UDP payload handled in the kernel */
	FR_MOQ_MAX_FRAMES = 16,        /* media frames per packet */
	FR_MOQ_MAX_ACK_RANGES = 16,    /* ranges per absorbed ACK */
	FR_MOQ_ACK_MAX_PAYLOAD = 128,  /* larger ACK-only packets go up to userspace */
	FR_MOQ_RING_SIZE = 1 << 25,    /* fr_moq_events: 32 MiB, over 300000 one-frame SENT records */
	FR_MOQ_MAX_TRACKS = 4,         /* distinct tracks per packet */
	FR_MOQ_MAX_SUBS = 256,         /* kernel-path subscribers per track */
	FR_MOQ_MAX_CONNS = 4096,       /* downstream connection slots */
	FR_MOQ_MAX_TRACK_IDS = 4096,   /* track ids (relay-wide) */
	FR_MOQ_STREAM_RESERVE = 16,    /* stream credit kept for protected (high-priority) subgroups */
	FR_MOQ_MAX_RECOVERY_CONNS = 256, /* connections whose loss recovery runs in the kernel (fr_moq_rec*) */
	FR_MOQ_SENT_SLOTS = 1024,      /* sent packets tracked per such connection; power of two (pn & mask) */
	FR_MOQ_RTT_SAMPLES = 5,        /* HyStart RTT monitor window (aioquic's QuicRttMonitor) */
	FR_MOQ_LR_MAX_RANGES = 16,     /* acked / lost ranges one fr_moq_recover call reports */
	FR_MOQ_PKT_FRAMES = 2,         /* stream frames a sent packet's entry holds (more: in its SENT record) */
	FR_MOQ_USER_ACK_EVERY = 64,    /* one absorbed ACK-only packet in this many still goes up (aioquic's
	                                * view of the peer's packet numbers stays fresh) */
};

struct fr_moq_cid {
	__u8 b[FR_MOQ_CID_LEN];
};

/* fr_moq_cfg[0] */
struct fr_moq_config {
	__be16 port;                 /* relay UDP port; 0 = disabled */
	__u8 enabled;
	__u8 pad;
	__u32 csum_v6_flags;         /* BPF_F_IPV6 where the kernel has it */
};

/* fr_moq_up: key = the relay's connection id on a publisher connection */
struct fr_moq_upconn {
	__u32 id;                    /* upstream connection id (relay-wide) */
	__u8 family;
	__u8 pad;
	__be16 peer_port;            /* only packets from the validated peer address count */
	__u8 peer_ip[16];
};

/* fr_moq_alias: (upstream connection, track alias) -> track */
struct fr_moq_alias_key {
	__u32 up;
	__u32 pad;
	__u64 alias;
};

struct fr_moq_alias_val {
	__u32 track;
	__u8 default_priority;       /* for headers with DEFAULT_PRIORITY */
	__u8 pad[3];
};

/* fr_moq_ustream: what the ingress learnt about an upstream stream at its offset 0 */
struct fr_moq_stream_key {
	__u32 conn;                  /* upstream connection id (ustream) or downstream slot (dstream) */
	__u32 up;                    /* upstream connection id (dstream), 0 for ustream */
	__u64 stream;                /* upstream stream id */
};

enum fr_moq_ustream_kind {
	FR_MOQ_US_SUBGROUP = 1,      /* a subgroup of a known track: fanned out */
	FR_MOQ_US_OTHER,             /* not media for the kernel (header unknown/split): userspace's */
	FR_MOQ_US_ENDED,             /* finished or reset: late copies of its packets only go up */
};

struct fr_moq_ustream {
	__u32 track;
	__u8 kind;                   /* enum fr_moq_ustream_kind */
	__u8 priority;               /* publisher priority of the subgroup */
	__u8 pad[2];
	__u64 group;
};

/* fr_moq_tracks[track]: kernel-path subscriber slots (torn reads are harmless: each slot is
 * re-checked against fr_moq_conns and fr_moq_dsub) */
struct fr_moq_track {
	__u32 count;
	__u32 pad;
	__u32 conns[FR_MOQ_MAX_SUBS];
};

/* fr_moq_dsub: (downstream slot, track) -> the alias the subscriber knows the track by */
struct fr_moq_dsub_key {
	__u32 conn;
	__u32 track;
};

struct fr_moq_dsub {
	__u64 alias;
};

/* fr_moq_conns[slot]: a subscriber connection, written by userspace only. An entry exists
 * only after the handshake completed and the peer address was validated. */
struct fr_moq_conn {
	__u32 gen;                   /* 0 = free slot; changes when the slot is reused */
	__u32 ifindex;               /* relay-side egress interface */
	__u8 dst_mac[6];
	__u8 src_mac[6];
	__be16 dst_port;
	__be16 src_port;
	__u8 family;
	__u8 protect_priority;       /* under pressure, new subgroups with a larger value are skipped */
	__u16 max_payload;           /* largest UDP payload towards this peer */
	__u8 dst_ip[16];
	__u8 src_ip[16];
	__u8 dcid[FR_MOQ_CID_LEN];   /* the peer's connection id (destination of our packets) */
	__u64 max_stream;            /* first server-unidirectional stream id the peer does not allow */
	__u64 stream_window;         /* peer's initial MAX_STREAM_DATA for our unidirectional streams */
	__s64 skip_below;            /* congestion: budget under which the kernel stops sending (see the egress) */
	__u8 absorb_acks;            /* ACK-only packets from the peer are read by the kernel (see the ingress) */
	__u8 recovery;               /* loss recovery and congestion control run in the kernel (fr_moq_rec[slot]) */
	__u8 pad2[6];
};

/* fr_moq_state[slot]: counters shared by kernel and userspace, changed only atomically
 * (userspace through the fr_moq_take syscall program). */
struct fr_moq_state {
	__u64 next_pn;               /* next packet number on the wire */
	__u64 next_stream;           /* next server-unidirectional stream id */
	__s64 budget;                /* congestion window bytes the kernel may still send; with kernel
	                              * recovery: added to cwnd - bytes in flight (userspace holds back
	                              * low-priority subgroups with a negative value) */
	__s64 credit;                /* connection flow-control bytes the kernel may still send */
	__u64 packets;               /* sent by the kernel */
	__u64 bytes;
	__u64 renumbered;            /* userspace packets renumbered */
};

/* fr_moq_dcid: the peer's connection id -> downstream slot (renumbering userspace packets);
 * fr_moq_hcid: the relay's current connection id on a downstream connection -> its slot
 * (absorbing the peer's ACK-only packets) */
struct fr_moq_slot {
	__u32 slot;
	__u32 gen;
};

enum fr_moq_dstream_state {
	FR_MOQ_DS_FORWARD = 1,       /* the kernel sends it */
	FR_MOQ_DS_SKIPPED,           /* congestion: never started for this subscriber */
	FR_MOQ_DS_USER,              /* handed to userspace from `handover` on */
	FR_MOQ_DS_ABANDONED,         /* started, then dropped: userspace resets it */
	FR_MOQ_DS_NOT_JOINED,        /* began before the subscriber was in the kernel set */
};

/* fr_moq_dstream: (downstream slot, upstream connection, upstream stream) */
struct fr_moq_dstream {
	__u64 stream;                /* downstream stream id */
	__u64 limit;                 /* peer's MAX_STREAM_DATA for it */
	__u64 handover;              /* upstream offset userspace continues from (USER/ABANDONED) */
	__s32 delta;                 /* downstream offset - upstream offset (alias re-encoded) */
	__u8 state;                  /* enum fr_moq_dstream_state */
	__u8 priority;
	__u8 fin;                    /* the kernel sent its FIN (sent_end is the stream's size) */
	__u8 pad;
	__u64 sent_end;              /* downstream bytes the kernel sent (a reset's final size covers them) */
};

/* fr_moq_take argument (SEC("syscall") program, run by userspace for atomic changes) */
struct fr_moq_take_args {
	__u32 slot;
	__u32 op;                    /* enum fr_moq_take_op */
	__s64 value;
	__s64 result;                /* the field's value before the change */
};

enum fr_moq_take_op {
	FR_MOQ_TAKE_PN = 0,          /* next_pn += value */
	FR_MOQ_TAKE_STREAM,          /* next_stream += 4 * value */
	FR_MOQ_ADD_BUDGET,           /* budget += value */
	FR_MOQ_ADD_CREDIT,           /* credit += value */
	FR_MOQ_SET_PN,               /* next_pn = max(next_pn, value) */
};

/*
 * Ring buffer fr_moq_events. Each record type has its own struct; all start with kind, slot
 * and gen at the same offsets, and those ending in an array are written only as far as their
 * count says (the ring's record length tells the reader too).
 */
enum fr_moq_record_kind {
	FR_MOQ_REC_SENT = 1,           /* a kernel-built packet left: register it */
	FR_MOQ_REC_RENUMBERED,         /* a userspace packet left with another number */
	FR_MOQ_REC_HANDOVER,           /* a stream handed to userspace */
	FR_MOQ_REC_ACK,                /* an ACK-only packet of the peer, read and dropped */
	FR_MOQ_REC_LOST,               /* kernel recovery: a kernel-built packet was lost or given up for a probe */
	FR_MOQ_REC_TIMER,              /* kernel recovery: a connection's loss detection timer fired */
};

/* One STREAM or DATAGRAM frame of a SENT packet. */
struct fr_moq_sent_frame {
	__u64 stream;                  /* downstream stream id (DATAGRAM: 0, see `datagram`) */
	__u64 offset;                  /* downstream offset */
	__u64 up_stream;               /* the upstream stream it was copied from */
	__u64 up_offset;
	__u16 len;                     /* frame data bytes */
	__u8 fin;
	__u8 datagram;                 /* a DATAGRAM frame (an object datagram), not a STREAM frame */
	__u8 pad[4];
};

struct fr_moq_sent {
	__u8 kind;                     /* FR_MOQ_REC_SENT */
	__u8 nframes;                  /* 0: the number was spent on a packet that was dropped */
	__u16 bytes;                   /* UDP payload bytes */
	__u32 slot;
	__u32 gen;
	__u32 track;
	__u32 up;                      /* upstream connection the frames came from */
	__u32 pad;
	__u64 pn;                      /* wire packet number */
	__u64 time_ns;                 /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	struct fr_moq_sent_frame frames[FR_MOQ_MAX_FRAMES];
};

struct fr_moq_renumbered {
	__u8 kind;                     /* FR_MOQ_REC_RENUMBERED */
	__u8 pad;
	__u16 local_pn;                /* the 16 bits userspace wrote */
	__u32 slot;
	__u32 gen;
	__u32 bytes;                   /* UDP payload bytes */
	__u64 pn;                      /* the number it left with */
	__u64 time_ns;
};

enum fr_moq_handover_reason {
	FR_MOQ_HO_FLOW = 1,            /* the peer's flow-control credit: userspace continues it */
	FR_MOQ_HO_SIZE,                /* the copy would not fit the packet: userspace continues it */
	FR_MOQ_HO_CONGESTION,          /* a low-priority subgroup of a congested peer: abandoned, userspace resets it */
};

struct fr_moq_handover {
	__u8 kind;                     /* FR_MOQ_REC_HANDOVER */
	__u8 state;                    /* enum fr_moq_dstream_state: USER or ABANDONED */
	__u8 reason;                   /* enum fr_moq_handover_reason */
	__u8 priority;                 /* the subgroup's publisher priority */
	__u32 slot;
	__u32 gen;
	__u32 track;
	__u32 up;
	__u32 pad;
	__u64 stream;                  /* downstream stream id */
	__u64 offset;                  /* downstream offset the kernel stopped at */
	__u64 up_stream;
	__u64 up_offset;               /* upstream offset userspace continues from */
	__u64 group;
	__u64 time_ns;
};

struct fr_moq_ack_range {
	__u64 smallest;
	__u64 largest;
};

/* A stream frame a sent packet carried (kernel recovery keeps FR_MOQ_PKT_FRAMES per packet). */
struct fr_moq_pkt_frame {
	__u64 stream;                  /* downstream stream id */
	__u64 offset;
	__u16 len;
	__u8 fin;
	__u8 pad[5];
};

enum fr_moq_lost_flags {
	FR_MOQ_LOST_EXPIRED = 1,       /* given up for a probe (PTO), not a congestion loss */
	FR_MOQ_LOST_RECORDED = 2,      /* frames not here: in the packet's SENT record */
};

struct fr_moq_lost {
	__u8 kind;                     /* FR_MOQ_REC_LOST */
	__u8 flags;                    /* enum fr_moq_lost_flags */
	__u8 nframes;
	__u8 pad;
	__u32 slot;
	__u32 gen;
	__u32 bytes;
	__u64 pn;
	struct fr_moq_pkt_frame frames[FR_MOQ_PKT_FRAMES];
};

struct fr_moq_timer {
	__u8 kind;                     /* FR_MOQ_REC_TIMER */
	__u8 pad[3];
	__u32 slot;
	__u32 gen;
	__u32 pad2;
	__u64 time_ns;
};

struct fr_moq_ack {
	__u8 kind;                     /* FR_MOQ_REC_ACK */
	__u8 nranges;                  /* highest range first */
	__u16 pn;                      /* the ACK packet's own (16-bit) number */
	__u32 slot;
	__u32 gen;
	__u32 bytes;                   /* its UDP payload bytes */
	__u64 largest;                 /* Largest Acknowledged */
	__u64 ack_delay;               /* ACK Delay field as sent (unscaled) */
	__u64 time_ns;                 /* arrival */
	struct fr_moq_ack_range ranges[FR_MOQ_MAX_ACK_RANGES];
};

/* ---------------------------------------------------------------- kernel loss recovery
 * RFC 9002 1-RTT loss recovery and NewReno, as aioquic's QuicPacketRecovery with "reno" (see
 * moq/recovery.h), per recovery slot (< FR_MOQ_MAX_RECOVERY_CONNS). Times in ns
 * (CLOCK_MONOTONIC), 0 = none unless said otherwise. Memory: fr_moq_rec 256 x 344 B (86 KiB),
 * fr_moq_rec_sent 256 x 72 KiB (18 MiB), fr_moq_rec_io 256 x 896 B (224 KiB). A connection has at
 * most FR_MOQ_SENT_SLOTS packets outstanding (1.2 MB at 1200 bytes: 100 Mbit/s at 100 ms RTT);
 * a SENT beyond is refused (FR_MOQ_LR_E_FULL) and the sender must wait.
 */
/* fr_moq_rec[slot] */
struct fr_moq_recovery {
	__u32 gen;                   /* owner generation (0 = unused): every call names it */
	__u32 pto_count;
	__u64 base;                  /* no packet below this number is outstanding */
	__u64 sent_end;              /* 1 + largest number registered (pns < base + FR_MOQ_SENT_SLOTS) */
	__u64 largest_acked;         /* aioquic's space.largest_acked_packet (starts at 0) */
	__u64 loss_time;             /* time-threshold loss timer, 0 = none */
	__u64 time_of_last_ack_eliciting;
	__u64 ack_eliciting_in_flight;
	__u64 bytes_in_flight;
	__u64 srtt;
	__u64 rttvar;
	__u64 min_rtt;               /* ~0 until the first sample */
	__u64 latest_rtt;
	__u64 first_sample_time;
	__u64 rtt_initialized;
	__u64 cwnd;
	__u64 ssthresh;              /* 0 = none (slow start) */
	__u64 recovery_start;        /* congestion recovery period start */
	__u64 stash;                 /* congestion avoidance byte stash */
	__u64 max_datagram_size;
	__u64 max_ack_delay;
	__u64 initial_rtt;
	__u64 mon_samples[8];        /* HyStart RTT monitor (QuicRttMonitor): the first FR_MOQ_RTT_SAMPLES */
	__u64 mon_sample_time;
	__u64 mon_sample_min;
	__u64 mon_sample_max;
	__u64 mon_filtered_min;      /* ~0 = none */
	__u32 mon_idx;
	__u32 mon_increases;
	__u32 mon_ready;
	__u32 pad;
	__u64 acked_total;           /* packets acknowledged, declared lost, expired by a PTO */
	__u64 lost_total;
	__u64 expired_total;
	__u64 user_outstanding;      /* packets userspace built that are outstanding (ACKs go up for them) */
	__u64 absorbed;              /* the peer's ACK-only packets applied in the kernel */
	__u64 timer_at;              /* when the armed bpf_timer fires, 0 = not armed */
	__u64 busy;                  /* a call is working on the slot (taken by compare-and-swap) */
	__u32 ack_delay_exponent;    /* the peer's, for ACK frames read in the kernel */
	__u32 pad2;
};

enum fr_moq_pkt_flags {
	FR_MOQ_PKT_ACK_ELICITING = 1,
	FR_MOQ_PKT_IN_FLIGHT = 2,
	FR_MOQ_PKT_KERNEL = 4,       /* built by the kernel (its stream frames are in the entry) */
	FR_MOQ_PKT_RECORDED = 8,     /* ... more of them than the entry holds: in its SENT record */
};

enum fr_moq_pkt_state {
	FR_MOQ_PKT_FREE = 0,
	FR_MOQ_PKT_OUTSTANDING,
	FR_MOQ_PKT_ACKED,
	FR_MOQ_PKT_LOST,
	FR_MOQ_PKT_EXPIRED,          /* given up by a PTO for a probe (no congestion event) */
};

/* One sent packet; valid only while gen is the slot's and state OUTSTANDING. */
struct fr_moq_sent_pkt {
	__u64 pn;
	__u64 sent_time;
	__u32 gen;
	__u16 bytes;
	__u8 flags;                  /* enum fr_moq_pkt_flags */
	__u8 state;                  /* enum fr_moq_pkt_state; written last by a sender */
	__u8 nframes;                /* stream frames below (KERNEL) */
	__u8 pad[7];
	struct fr_moq_pkt_frame frames[FR_MOQ_PKT_FRAMES];
};

/* fr_moq_rec_sent[slot]: packet pn at pkts[pn & (FR_MOQ_SENT_SLOTS - 1)] */
struct fr_moq_sent_table {
	struct fr_moq_sent_pkt pkts[FR_MOQ_SENT_SLOTS];
};

enum fr_moq_lr_op {
	FR_MOQ_LR_INIT = 0,          /* gen, pn = first number, bytes = max datagram size,
	                              * ack_delay_ns = max_ack_delay, initial_rtt_ns,
	                              * flags = the peer's ack_delay_exponent */
	FR_MOQ_LR_SENT,              /* pn, time_ns, bytes, flags */
	FR_MOQ_LR_ACK,               /* ranges (highest first, disjoint), ack_delay_ns, time_ns = now */
	FR_MOQ_LR_TIMEOUT,           /* time_ns = now: the loss detection timer fired */
	FR_MOQ_LR_EXPIRE,            /* time_ns = now: the slot's bpf_timer fired: TIMEOUT if the loss
	                              * detection time has come, else the timer is armed again */
};

enum fr_moq_lr_status {
	FR_MOQ_LR_OK = 0,
	FR_MOQ_LR_E_SLOT,            /* no such slot, or another generation owns it */
	FR_MOQ_LR_E_ARGS,            /* malformed ranges, an ACK of a number never sent, bad INIT values */
	FR_MOQ_LR_E_FULL,            /* pn >= base + FR_MOQ_SENT_SLOTS: not registered */
	FR_MOQ_LR_E_PN,              /* pn below base or already outstanding */
	FR_MOQ_LR_E_BUSY,            /* another call works on the slot: try again */
	FR_MOQ_LR_ACKED_EARLY,       /* SENT: its ACK came first (nothing counted in flight) */
};

enum fr_moq_lr_flags {
	FR_MOQ_LR_RTT_SAMPLE = 1,    /* the ACK gave an RTT sample */
	FR_MOQ_LR_CONGESTION = 2,    /* a new congestion event (window halved) */
	FR_MOQ_LR_PERSISTENT = 4,    /* persistent congestion: window collapsed */
	FR_MOQ_LR_TRUNCATED = 8,     /* more lost runs than lost_ranges holds (cannot happen: <= 4) */
};

/* fr_moq_recover argument (SEC("syscall")); results are written back into it. Ranges out are
 * ascending. acked_ranges: every packet outstanding before the call in a range is now acked;
 * lost_ranges: every packet still outstanding after those in a range is now lost (or, with
 * `expired`, given up for a probe). Packets below `base` not reported lost were acknowledged. */
struct fr_moq_recover_args {
	__u32 slot;
	__u32 gen;
	__u32 op;                    /* enum fr_moq_lr_op */
	__u32 flags;                 /* SENT: enum fr_moq_pkt_flags */
	__u64 pn;
	__u64 time_ns;
	__u32 bytes;
	__u32 nranges;
	__u64 ack_delay_ns;
	__u64 initial_rtt_ns;
	struct fr_moq_ack_range ranges[FR_MOQ_MAX_ACK_RANGES];
	/* results */
	__s32 status;                /* enum fr_moq_lr_status */
	__u32 out_flags;             /* enum fr_moq_lr_flags */
	__u32 acked;                 /* packets newly acknowledged */
	__u32 lost;                  /* packets declared lost (congestion signal) */
	__u32 expired;               /* packets given up by a PTO (no congestion signal) */
	__u32 nacked_ranges;
	__u32 nlost_ranges;
	__u32 pad;
	__u64 timer_ns;              /* loss detection timer afterwards, 0 = none */
	__u64 base;                  /* state afterwards */
	__u64 cwnd;
	__u64 bytes_in_flight;
	__u64 srtt;
	struct fr_moq_ack_range acked_ranges[FR_MOQ_LR_MAX_RANGES];
	struct fr_moq_ack_range lost_ranges[FR_MOQ_LR_MAX_RANGES];
};

enum fr_moq_counter {
	FR_MQ_RX = 0,                /* 1-RTT packets of a publisher connection */
	FR_MQ_FANNED,                /* of those, cloned to at least one subscriber */
	FR_MQ_CLONES,
	FR_MQ_SENT,                  /* packets the egress built and sent */
	FR_MQ_SENT_BYTES,
	FR_MQ_RENUMBERED,            /* userspace packets renumbered */
	FR_MQ_PASS_UNPARSED,         /* frames the kernel cannot parse: the packet only goes up */
	FR_MQ_PASS_OVERSIZE,
	FR_MQ_PASS_BAD_TAG,
	FR_MQ_PASS_SPOOFED,          /* known connection id, wrong source address */
	FR_MQ_STREAM_OTHER,          /* upstream stream not recognised as a subgroup */
	FR_MQ_SKIP_CONGESTION,       /* subgroups skipped for a congested subscriber */
	FR_MQ_SKIP_STREAM_LIMIT,     /* subgroups skipped: no stream credit */
	FR_MQ_HANDOVER_FLOW,         /* streams handed to userspace: flow-control credit */
	FR_MQ_HANDOVER_SIZE,         /* streams handed to userspace: copy would exceed the MTU */
	FR_MQ_ABANDONED,             /* started subgroups abandoned (reset by userspace) */
	FR_MQ_NOT_JOINED,            /* clone frames of streams that began before the subscriber joined */
	FR_MQ_DROP_EMPTY,            /* clones with nothing for the subscriber */
	FR_MQ_CLONE_DROPPED,         /* clones the egress dropped (nothing for that subscriber) or that failed */
	FR_MQ_ERR,                   /* helper failures */
	FR_MQ_RINGBUF_FULL,          /* packet not sent: no room for its record */
	FR_MQ_ACKS_ABSORBED,         /* ACK-only packets of kernel-path subscribers turned into records */
	FR_MQ_ACKS_PASSED_BUSY,      /* ... passed up instead: the ring was filling (the relay is behind) */
	FR_MQ_LR_BUSY,               /* ACK-only packets passed up: the connection's recovery was busy */
	FR_MQ_LR_LOST,               /* kernel-built packets declared lost (LOST records) */
	FR_MQ_LR_EXPIRED,            /* kernel-built packets given up for a probe */
	FR_MQ_LR_TIMERS,             /* loss detection timers fired */
	FR_MQ_LR_FULL,               /* streams handed over: the sent-packet table was full */
	FR_MQ_MAX,
};

#endif /* FASTRELAY_H */
