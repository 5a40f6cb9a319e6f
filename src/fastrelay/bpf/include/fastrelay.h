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
#define FR_TAG_MAGIC 0x46524c42      /* "FRLB", little endian in the payload */

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
	__u32 pad2;
};

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

#endif /* FASTRELAY_H */
