/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The MoQT fast path's maps, its per-CPU scratch area and the helpers every stage uses.
 * Layouts shared with userspace are in include/fastrelay.h; what is here is kernel-only.
 *
 * Verifier discipline for every stage: work that branches (frame parsing, per-frame clone
 * building, ACK reading, header rewriting) lives in global functions, which the verifier
 * checks once each, on their own, with unknown arguments. The bpf_loop callbacks only call
 * them. Static code inlined into a callback would be verified again at every call site and
 * at every replay of the callback until its state converges.
 */
#ifndef FR_MOQ_MAPS_H
#define FR_MOQ_MAPS_H

#include "fr_packet.h"
#include "fastrelay.h"
#include <linux/pkt_cls.h>

#define MASK (FR_MOQ_BUF - 1)
#define FR_TTL 64
#define FR_PACKET_HOST 0
#define SHORT_HDR_LEN (1 + FR_MOQ_CID_LEN + 2)   /* first byte, DCID, 2-byte packet number */
/* An index the compiler cannot prove in range and so keeps the mask the verifier needs. */
#define BOUNDED(v, mask) ({ __u32 __b = (v); asm volatile("" : "+r"(__b)); __b & (mask); })
/* A value the compiler cannot see through (keeps arithmetic from becoming branches). */
#define OPAQUE(v) ({ __u64 __o = (v); asm volatile("" : "+r"(__o)); __o; })
#define GLOBAL __attribute__((noinline))
/* A bpf_loop callback's return value from a global function's: the verifier wants [0, 1] and
 * sees a global function's result as any scalar; the barrier keeps clang from dropping the
 * mask (it knows the function returns 0 or 1). */
#define CB_RESULT(v) ({ long __r = (v); asm volatile("" : "+r"(__r)); __r & 1; })

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fr_moq_config);
} fr_moq_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct fr_moq_cid);
	__type(value, struct fr_moq_upconn);
} fr_moq_up SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct fr_moq_alias_key);
	__type(value, struct fr_moq_alias_val);
} fr_moq_alias SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fr_moq_stream_key);
	__type(value, struct fr_moq_ustream);
} fr_moq_ustream SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_TRACK_IDS);
	__type(key, __u32);
	__type(value, struct fr_moq_track);
} fr_moq_tracks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fr_moq_dsub_key);
	__type(value, struct fr_moq_dsub);
} fr_moq_dsub SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_CONNS);
	__type(key, __u32);
	__type(value, struct fr_moq_conn);
} fr_moq_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_CONNS);
	__uint(map_flags, BPF_F_MMAPABLE);      /* userspace reads it without a syscall */
	__type(key, __u32);
	__type(value, struct fr_moq_state);
} fr_moq_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FR_MOQ_MAX_CONNS * 2);
	__type(key, struct fr_moq_cid);
	__type(value, struct fr_moq_slot);
} fr_moq_dcid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FR_MOQ_MAX_CONNS);
	__type(key, struct fr_moq_cid);
	__type(value, struct fr_moq_slot);
} fr_moq_hcid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct fr_moq_stream_key);
	__type(value, struct fr_moq_dstream);
} fr_moq_dstream SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FR_MQ_MAX);
	__type(key, __u32);
	__type(value, __u64);
} fr_moq_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FR_MOQ_RING_SIZE);
} fr_moq_events SEC(".maps");

/* ---------------------------------------------------------------- per-CPU scratch */
enum frame_kind {
	FK_NONE = 0,                 /* not for subscribers */
	FK_STREAM,                   /* STREAM frame of a subgroup of a known track */
	FK_DATAGRAM,                 /* object datagram of a known track */
};

/* One frame of the packet being fanned out, as parse and classify left it. */
struct pframe {
	__u64 stream;
	__u64 offset;
	__u64 group;
	__u32 track;
	__u16 data_off;              /* in scratch.in (0 = first byte of the UDP payload) */
	__u16 len;
	__u16 alias_off;             /* offset 0 / datagram: where the track alias varint sits */
	__u8 alias_len;
	__u8 kind;                   /* enum frame_kind */
	__u8 fin;
	__u8 priority;
	__u8 fresh;                  /* the stream's first packet seen (a subscriber may join it here) */
	__u8 pad;
};

/* Frame parser state, kept across bpf_loop steps. */
struct parse_state {
	__u32 off;
	__u32 end;
	__u32 skip_v;                /* varints of the current frame still to skip */
	__u32 vidx;                  /* varints of the current frame read so far */
	__u32 fixed;                 /* bytes to skip after them */
	__u8 ack;                    /* current frame is an ACK: its range count adds varints */
	__u8 ecn;
	__u8 len_last;               /* the last varint is a byte length to skip */
	__u8 err;
};

/* The clone being built by the egress. */
struct build_state {
	__u64 alias;                 /* the subscriber's alias for the track */
	__u32 slot;
	__u32 pos;                   /* next byte in scratch.out */
	__u32 limit;                 /* largest payload (tag included) */
	__u8 alias_len;
	__u8 nout;                   /* frames written (sent.frames[]) */
	__u8 notable;                /* a frame starts a stream: userspace needs the SENT record */
	__u8 full;                   /* kernel recovery: the sent-packet table has no room */
	__s64 budget;                /* congestion window bytes left (negative: over) */
};

/* The egress runs synchronously inside the ingress's bpf_clone_redirect on the same CPU,
 * so the ingress leaves its parse here for it. */
struct scratch {
	__u32 armed;                 /* 1 + slot of the clone in flight, 0 otherwise */
	__u32 track;                 /* its track */
	__u32 up;                    /* upstream connection of the packet */
	__u16 payload_len;           /* UDP payload length of the original */
	__u8 nframes;
	__u8 ntracks;
	__u32 tracks[FR_MOQ_MAX_TRACKS];
	struct parse_state ps;
	struct build_state bs;
	struct pframe frames[FR_MOQ_MAX_FRAMES];
	struct fr_moq_sent sent;     /* the SENT record being assembled */
	struct fr_moq_ack ack;       /* the ACK record being assembled */
	__u8 in[FR_MOQ_BUF + 16];    /* the original's UDP payload (+ slack for 8-byte reads) */
	__u8 out[FR_MOQ_BUF * 2];    /* the clone's UDP payload */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} fr_moq_scratch SEC(".maps");

static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&fr_moq_scratch, &zero);
}

static __always_inline void count_n(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&fr_moq_stats, &idx);

	if (v)
		*v += n;
}

static __always_inline void count(__u32 idx)
{
	count_n(idx, 1);
}

/* Records the control plane reads before its next input anyway wake nobody, unless the ring is
 * filling up; an absorbed ACK wakes the reader (its loss recovery is waiting for it). */
#define RB_WAKE_AT (FR_MOQ_RING_SIZE / 16)
/* Above this much unread, subscribers' ACKs go up through the socket instead: a packet the egress
 * sends must always find room for its record (without one it could not be registered). */
#define RB_ACKS_UP_AT (FR_MOQ_RING_SIZE / 8)
/* The egress builds a packet only with this much room left (the record is written after the
 * packet, when its number is spent; both CPUs together cannot fill this in between). */
#define RB_SEND_HEADROOM (1 << 20)

static __always_inline __u64 rb_lazy(void)
{
	return bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > RB_WAKE_AT ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

#endif /* FR_MOQ_MAPS_H */
