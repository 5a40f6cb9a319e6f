// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * MoQT relay fast path: two TC programs and a syscall program sharing one set of maps.
 *
 * fr_moq_ingress (TC ingress, interfaces publishers reach the relay on): a 1-RTT packet of
 * a publisher connection (known destination connection id, validated source address,
 * plaintext mode) is parsed frame by frame; each STREAM frame's stream is tied to a track
 * when its subgroup header (offset 0) is seen; the packet is cloned once per kernel-path
 * subscriber of each track it carries, and the original goes up to the relay's socket, so
 * the upstream connection acknowledges it and the cache fills.
 *
 * fr_moq_egress (TC egress, interfaces subscribers are reached on): a clone becomes a
 * packet of the subscriber's connection (addresses, connection id, packet number from the
 * connection's counter, stream id, offsets and track alias) carrying only that track's
 * frames, within the connection's flow-control credit and congestion budget, and is
 * reported in a ring-buffer record so userspace registers it in the connection's loss
 * recovery. A packet userspace sent on such a connection is renumbered from the same
 * counter and reported too. The clone is processed synchronously inside the ingress
 * program's bpf_clone_redirect on the same CPU, so the ingress leaves its parse in a
 * per-CPU scratch area for the egress.
 *
 * fr_moq_take (syscall): userspace's atomic changes to the shared counters.
 */
#include "fr_packet.h"
#include "fastrelay.h"
#include <linux/pkt_cls.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

FR_EXPORT_BTF(struct fr_moq_event, moq_event);
FR_EXPORT_BTF(enum fr_moq_counter, moq_counter);
FR_EXPORT_BTF(enum fr_moq_take_op, moq_take_op);
FR_EXPORT_BTF(enum fr_moq_dstream_state, moq_dstream_state);
FR_EXPORT_BTF(enum fr_moq_event_kind, moq_event_kind);
FR_EXPORT_BTF(enum fr_moq_ustream_kind, moq_ustream_kind);

#define MASK (FR_MOQ_BUF - 1)
#define FR_TTL 64
#define FR_PACKET_HOST 0
#define SHORT_HDR_LEN (1 + FR_MOQ_CID_LEN + 2)   /* first byte, DCID, 2-byte packet number */
#define DATAGRAM_STREAM (~0ULL)
/* An index the compiler cannot prove in range and so keeps the mask the verifier needs. */
#define BOUNDED(v, mask) ({ __u32 __b = (v); asm volatile("" : "+r"(__b)); __b & (mask); })

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

struct scratch {
	__u64 ack_lo[FR_MOQ_MAX_FRAMES];   /* an absorbed ACK's ranges (smallest, largest) */
	__u64 ack_hi[FR_MOQ_MAX_FRAMES];
	__u32 armed;                 /* 1 + slot of the clone in flight, 0 otherwise */
	__u32 track;                 /* its track */
	__u32 up;                    /* upstream connection of the packet */
	__u16 payload_len;           /* UDP payload length of the original */
	__u8 nframes;
	__u8 pad;
	struct pframe frames[FR_MOQ_MAX_FRAMES];
	__u8 in[FR_MOQ_BUF + 16];
	__u8 out[FR_MOQ_BUF * 2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} fr_moq_scratch SEC(".maps");

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
 * sent must always find room for its record (without one it could not be registered). */
#define RB_ACKS_UP_AT (FR_MOQ_RING_SIZE / 8)
static __always_inline __u64 rb_lazy(void)
{
	return bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > RB_WAKE_AT ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* ---------------------------------------------------------------- QUIC varints */
/* Read a varint at buf[off] (all of it before `end`); returns its length or -1. */
static __always_inline int get_varint(const __u8 *buf, __u32 off, __u32 end, __u64 *val)
{
	__u64 v;
	__u8 b0;
	int len, i;

	if (off >= end || off >= FR_MOQ_BUF)
		return -1;
	b0 = buf[BOUNDED(off, MASK)];
	len = 1 << (b0 >> 6);
	if (off + len > end)
		return -1;
	v = b0 & 0x3f;
#pragma unroll
	for (i = 1; i < 8; i++)
		if (i < len)
			v = (v << 8) | buf[BOUNDED(off + i, MASK)];
	*val = v;
	return len;
}

static __always_inline int varint_len(__u64 v)
{
	return v < (1ULL << 6) ? 1 : v < (1ULL << 14) ? 2 : v < (1ULL << 30) ? 4 : 8;
}

/* Write v as a varint of `len` bytes at out[pos]. */
static __always_inline void put_varint(__u8 *out, __u32 pos, __u64 v, int len)
{
	int i;

#pragma unroll
	for (i = 0; i < 8; i++) {
		if (i < len) {
			out[BOUNDED(pos + len - 1 - i, 2 * FR_MOQ_BUF - 1)] = v & 0xff;
			v >>= 8;
		}
	}
	out[BOUNDED(pos, 2 * FR_MOQ_BUF - 1)] |= (len == 1 ? 0 : len == 2 ? 0x40 : len == 4 ? 0x80 : 0xc0);
}

/* ---------------------------------------------------------------- ingress: parse */
struct parse_ctx {
	struct scratch *s;
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

static __always_inline int add_frame(struct parse_ctx *c, __u8 kind, __u64 stream, __u64 offset, __u64 len,
				     __u8 fin)
{
	struct scratch *s = c->s;
	struct pframe *f;

	if (len > c->end - c->off)
		return -1;
	if (s->nframes >= FR_MOQ_MAX_FRAMES)
		return -1;
	f = &s->frames[BOUNDED(s->nframes, FR_MOQ_MAX_FRAMES - 1)];
	f->stream = stream;
	f->offset = offset;
	f->data_off = c->off;
	f->len = len;
	f->fin = fin;
	f->kind = kind;          /* refined by classify() */
	f->alias_len = 0;
	f->fresh = 0;
	s->nframes++;
	c->off += len;
	return 0;
}

static long parse_one(__u32 i, void *data)
{
	struct parse_ctx *c = data;
	const __u8 *in = c->s->in;
	__u64 v, id, offset = 0, len;
	int n;

	if (c->off >= c->end)
		return 1;
	if (c->skip_v) {
		n = get_varint(in, c->off, c->end, &v);
		if (n < 0)
			goto bad;
		c->off += n;
		c->skip_v--;
		c->vidx++;
		if (c->ack && c->vidx == 3) {            /* ACK Range Count */
			if (v > 256)
				goto bad;
			c->skip_v += 2 * v + (c->ecn ? 3 : 0);
		}
		if (!c->skip_v) {
			if (c->len_last)
				c->off += v > FR_MOQ_BUF ? FR_MOQ_BUF : v;
			c->off += c->fixed;
			if (c->off > c->end)
				goto bad;
		}
		return 0;
	}

	n = get_varint(in, c->off, c->end, &v);
	if (n < 0)
		goto bad;
	c->off += n;
	c->ack = c->ecn = c->len_last = 0;
	c->fixed = 0;
	c->vidx = 0;
	switch (v) {
	case 0x00:               /* PADDING */
	case 0x01:               /* PING */
	case 0x1e:               /* HANDSHAKE_DONE */
		return 0;
	case 0x02:               /* ACK */
	case 0x03:
		c->ack = 1;
		c->ecn = v == 0x03;
		c->skip_v = 4;
		return 0;
	case 0x04:               /* RESET_STREAM */
		c->skip_v = 3;
		return 0;
	case 0x05:               /* STOP_SENDING */
	case 0x11:               /* MAX_STREAM_DATA */
	case 0x15:               /* STREAM_DATA_BLOCKED */
		c->skip_v = 2;
		return 0;
	case 0x06:               /* CRYPTO */
	case 0x1d:               /* CONNECTION_CLOSE (application) */
		c->skip_v = 2;
		c->len_last = 1;
		return 0;
	case 0x07:               /* NEW_TOKEN */
		c->skip_v = 1;
		c->len_last = 1;
		return 0;
	case 0x10:               /* MAX_DATA */
	case 0x12:               /* MAX_STREAMS */
	case 0x13:
	case 0x14:               /* DATA_BLOCKED */
	case 0x16:               /* STREAMS_BLOCKED */
	case 0x17:
	case 0x19:               /* RETIRE_CONNECTION_ID */
		c->skip_v = 1;
		return 0;
	case 0x18:               /* NEW_CONNECTION_ID: the 1-byte length (<= 20) reads as a varint */
		c->skip_v = 3;
		c->len_last = 1;
		c->fixed = 16;
		return 0;
	case 0x1a:               /* PATH_CHALLENGE */
	case 0x1b:               /* PATH_RESPONSE */
		c->off += 8;
		if (c->off > c->end)
			goto bad;
		return 0;
	case 0x1c:               /* CONNECTION_CLOSE (transport) */
		c->skip_v = 3;
		c->len_last = 1;
		return 0;
	case 0x30:               /* DATAGRAM, to the end of the packet */
		if (add_frame(c, FK_DATAGRAM, DATAGRAM_STREAM, 0, c->end - c->off, 0))
			goto bad;
		return 0;
	case 0x31:               /* DATAGRAM with length */
		n = get_varint(in, c->off, c->end, &len);
		if (n < 0)
			goto bad;
		c->off += n;
		if (add_frame(c, FK_DATAGRAM, DATAGRAM_STREAM, 0, len, 0))
			goto bad;
		return 0;
	}
	if (v >= 0x08 && v <= 0x0f) {                    /* STREAM */
		n = get_varint(in, c->off, c->end, &id);
		if (n < 0)
			goto bad;
		c->off += n;
		if (v & 0x04) {
			n = get_varint(in, c->off, c->end, &offset);
			if (n < 0)
				goto bad;
			c->off += n;
		}
		if (v & 0x02) {
			n = get_varint(in, c->off, c->end, &len);
			if (n < 0)
				goto bad;
			c->off += n;
		} else {
			len = c->end - c->off;
		}
		if (add_frame(c, FK_STREAM, id, offset, len, v & 0x01))
			goto bad;
		return 0;
	}
bad:                             /* unknown frame or inconsistent length: leave it to userspace */
	c->err = 1;
	return 1;
}

/*
 * Tie each frame to a track. A stream is learnt at its offset 0 from its SUBGROUP_HEADER;
 * a stream first seen elsewhere (its start was missed or reordered) stays userspace's, and
 * one that ended stays known as such (a late copy of its start must not open it again).
 */
static __always_inline void classify(struct scratch *s, struct pframe *f)
{
	struct fr_moq_stream_key key = { .conn = s->up, .stream = f->stream };
	struct fr_moq_alias_key akey = { .up = s->up };
	struct fr_moq_ustream us = { .kind = FR_MOQ_US_OTHER }, *known;
	struct fr_moq_alias_val *av;
	__u32 off = f->data_off, end = f->data_off + f->len;
	__u64 type, alias, group = 0, v;
	int n, an;

	if (f->kind == FK_DATAGRAM) {
		f->kind = FK_NONE;
		n = get_varint(s->in, off, end, &type);
		if (n < 0 || type > 0x2f)        /* OBJECT_DATAGRAM types 0x00..0x2f */
			return;
		an = get_varint(s->in, off + n, end, &alias);
		if (an < 0)
			return;
		akey.alias = alias;
		av = bpf_map_lookup_elem(&fr_moq_alias, &akey);
		if (!av)
			return;
		f->kind = FK_DATAGRAM;
		f->track = av->track;
		f->alias_off = off + n;
		f->alias_len = an;
		f->priority = av->default_priority;
		return;
	}

	known = bpf_map_lookup_elem(&fr_moq_ustream, &key);
	if (known) {
		if (known->kind != FR_MOQ_US_SUBGROUP) {
			f->kind = FK_NONE;
			return;
		}
		f->track = known->track;
		f->priority = known->priority;
		f->group = known->group;
		if (f->offset == 0) {            /* a retransmission of the start: find the alias again */
			n = get_varint(s->in, off, end, &type);
			an = n < 0 ? -1 : get_varint(s->in, off + n, end, &alias);
			if (an < 0) {
				f->kind = FK_NONE;
				return;
			}
			f->alias_off = off + n;
			f->alias_len = an;
		}
		return;
	}

	f->kind = FK_NONE;
	if (f->offset == 0) {
		n = get_varint(s->in, off, end, &type);
		/* SUBGROUP_HEADER: 0b00X1XXXX, SUBGROUP_ID_MODE 0b11 reserved */
		if (n < 0 || (type & 0xd0) != 0x10 || ((type >> 1) & 3) == 3)
			goto store;
		an = get_varint(s->in, off + n, end, &alias);
		if (an < 0)
			goto store;
		f->alias_off = off + n;
		f->alias_len = an;
		off += n + an;
		n = get_varint(s->in, off, end, &group);
		if (n < 0)
			goto store;
		off += n;
		if (((type >> 1) & 3) == 2) {    /* explicit Subgroup ID */
			n = get_varint(s->in, off, end, &v);
			if (n < 0)
				goto store;
			off += n;
		}
		akey.alias = alias;
		av = bpf_map_lookup_elem(&fr_moq_alias, &akey);
		if (!av)
			goto store;
		if (type & 0x20) {
			us.priority = av->default_priority;
		} else {
			if (off >= end)
				goto store;
			us.priority = s->in[BOUNDED(off, MASK)];
		}
		us.kind = FR_MOQ_US_SUBGROUP;
		us.track = av->track;
		us.group = group;
		f->kind = FK_STREAM;
		f->track = us.track;
		f->priority = us.priority;
		f->group = group;
	}
store:
	if (us.kind != FR_MOQ_US_SUBGROUP)
		count(FR_MQ_STREAM_OTHER);
	/* only the packet that creates the entry is the stream's start for subscribers: a start
	 * the publisher re-sent comes after packets that subscribers joined since have missed */
	if (bpf_map_update_elem(&fr_moq_ustream, &key, &us, BPF_NOEXIST) == 0)
		f->fresh = us.kind == FR_MOQ_US_SUBGROUP;
}

struct classify_ctx {
	struct scratch *s;
	__u32 tracks[FR_MOQ_MAX_TRACKS];
	__u32 ntracks;
};

static long classify_one(__u32 i, void *data)
{
	struct classify_ctx *c = data;
	struct pframe *f;
	__u32 j;

	if (i >= FR_MOQ_MAX_FRAMES || i >= c->s->nframes)
		return 1;
	f = &c->s->frames[BOUNDED(i, FR_MOQ_MAX_FRAMES - 1)];
	classify(c->s, f);
	if (f->kind == FK_NONE)
		return 0;
	for (j = 0; j < FR_MOQ_MAX_TRACKS; j++) {
		if (j >= c->ntracks)
			break;
		if (c->tracks[j] == f->track)
			return 0;
	}
	if (c->ntracks < FR_MOQ_MAX_TRACKS)
		c->tracks[BOUNDED(c->ntracks, FR_MOQ_MAX_TRACKS - 1)] = f->track;
	c->ntracks++;
	return 0;
}

struct fan_ctx {
	struct __sk_buff *skb;
	struct scratch *s;
	struct fr_moq_track *set;
	__u32 count;
	__u32 clones;
};

static long clone_one(__u32 i, void *data)
{
	struct fan_ctx *c = data;
	struct fr_moq_conn *conn;
	__u32 slot;

	if (i >= FR_MOQ_MAX_SUBS || i >= c->count)
		return 1;
	slot = c->set->conns[BOUNDED(i, FR_MOQ_MAX_SUBS - 1)];
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	if (!conn || !conn->gen)
		return 0;
	c->s->armed = slot + 1;
	if (bpf_clone_redirect(c->skb, conn->ifindex, 0))
		count(FR_MQ_CLONE_DROPPED);      /* the egress said why, in its own counters */
	else
		c->clones++;
	c->s->armed = 0;
	return 0;
}

/* ---------------------------------------------------------------- ingress: a subscriber's ACK-only packet */
struct ack_ctx {
	struct scratch *s;
	__u32 off;
	__u32 end;
	__u32 n;                     /* ranges read (the first one included) */
	__u32 count;                 /* ranges the frame has */
	__u8 err;
};

/* One more ACK Range (Gap, ACK Range Length) below the last one read. */
static long ack_range(__u32 i, void *data)
{
	struct ack_ctx *c = data;
	struct scratch *s = c->s;
	__u64 gap, len, lo;
	__u32 prev;
	int n;

	if (c->n >= c->count)
		return 1;
	n = get_varint(s->in, c->off, c->end, &gap);
	if (n < 0)
		goto bad;
	c->off += n;
	n = get_varint(s->in, c->off, c->end, &len);
	if (n < 0)
		goto bad;
	c->off += n;
	prev = BOUNDED(c->n - 1, FR_MOQ_MAX_FRAMES - 1);
	lo = s->ack_lo[prev];
	if (gap + 2 > lo || len > lo - gap - 2)    /* below packet number 0: a malformed frame */
		goto bad;
	s->ack_hi[BOUNDED(c->n, FR_MOQ_MAX_FRAMES - 1)] = lo - gap - 2;
	s->ack_lo[BOUNDED(c->n, FR_MOQ_MAX_FRAMES - 1)] = lo - gap - 2 - len;
	c->n++;
	return 0;
bad:
	c->err = 1;
	return 1;
}

/* A 1-RTT packet to the relay's current connection id on a kernel-path subscriber connection,
 * from that subscriber's validated address, holding one ACK frame and nothing but PADDING:
 * the ACK goes to userspace as a record (applied to the connection's loss recovery without
 * the packet climbing the stack) and the packet is dropped. Anything else goes up untouched. */
static __always_inline int absorb_ack(struct __sk_buff *skb, struct fr_udp_pkt *p, __u32 plen, __u8 first,
				      struct fr_moq_cid *cid)
{
	struct fr_moq_slot *hs;
	struct fr_moq_conn *conn;
	struct fr_moq_event *ev;
	struct scratch *s;
	struct ack_ctx ac = {};
	__u64 largest, delay, nranges, first_range, pn;
	__u32 zero = 0, off, slot, i;
	int n;

	hs = bpf_map_lookup_elem(&fr_moq_hcid, cid);
	if (!hs)
		return TC_ACT_UNSPEC;
	slot = hs->slot;
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	if (!conn || !conn->gen || conn->gen != hs->gen || !conn->absorb_acks)
		return TC_ACT_UNSPEC;
	if (p->family != conn->family || p->sport != conn->dst_port || __builtin_memcmp(p->saddr, conn->dst_ip, 16))
		return TC_ACT_UNSPEC;                     /* another path: aioquic validates it */
	if ((first & 0x1f) != 0x01 || plen > FR_MOQ_ACK_MAX_PAYLOAD || skb->gso_segs > 1)
		return TC_ACT_UNSPEC;                     /* key update, reserved bits, long numbers, big */
	s = bpf_map_lookup_elem(&fr_moq_scratch, &zero);
	if (!s || bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct udphdr), s->in, plen & 0xff))
		return TC_ACT_UNSPEC;
	if (*(__u64 *)&s->in[BOUNDED(plen - FR_MOQ_TAG_LEN, 0xff)] || *(__u64 *)&s->in[BOUNDED(plen - 8, 0xff)])
		return TC_ACT_UNSPEC;                     /* not identity protection */
	ac.s = s;
	ac.end = plen - FR_MOQ_TAG_LEN;
	off = SHORT_HDR_LEN;
	if (off >= ac.end || s->in[off] != 0x02)      /* ACK (ACK_ECN carries counts: it goes up) */
		return TC_ACT_UNSPEC;
	off++;
	n = get_varint(s->in, off, ac.end, &largest);
	if (n < 0)
		return TC_ACT_UNSPEC;
	off += n;
	n = get_varint(s->in, off, ac.end, &delay);
	if (n < 0)
		return TC_ACT_UNSPEC;
	off += n;
	n = get_varint(s->in, off, ac.end, &nranges);
	if (n < 0 || nranges >= FR_MOQ_MAX_FRAMES)
		return TC_ACT_UNSPEC;
	off += n;
	n = get_varint(s->in, off, ac.end, &first_range);
	if (n < 0 || first_range > largest)
		return TC_ACT_UNSPEC;
	off += n;
	s->ack_hi[0] = largest;
	s->ack_lo[0] = largest - first_range;
	ac.off = off;
	ac.n = 1;
	ac.count = nranges + 1;
	bpf_loop(FR_MOQ_MAX_FRAMES, ack_range, &ac, 0);
	if (ac.err || ac.n != ac.count)
		return TC_ACT_UNSPEC;
	for (i = 0; i < FR_MOQ_ACK_MAX_PAYLOAD; i++) {    /* the rest must be PADDING */
		if (ac.off + i >= ac.end)
			break;
		if (s->in[BOUNDED(ac.off + i, 0xff)])
			return TC_ACT_UNSPEC;
	}
	pn = ((__u64)s->in[1 + FR_MOQ_CID_LEN] << 8) | s->in[2 + FR_MOQ_CID_LEN];

	if (bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > RB_ACKS_UP_AT) {
		count(FR_MQ_ACKS_PASSED_BUSY);
		return TC_ACT_UNSPEC;                     /* the relay is behind: aioquic reads it the slow way */
	}
	ev = bpf_ringbuf_reserve(&fr_moq_events, sizeof(*ev), 0);
	if (!ev) {
		count(FR_MQ_RINGBUF_FULL);
		return TC_ACT_UNSPEC;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = FR_MOQ_EV_ACKED;
	ev->slot = slot;
	ev->gen = hs->gen;
	ev->bytes = plen;
	ev->pn = largest;
	ev->group = delay;
	ev->local_pn = pn;
	ev->time_ns = bpf_ktime_get_ns();
	ev->nframes = ac.n;
#pragma unroll
	for (i = 0; i < FR_MOQ_MAX_FRAMES; i++) {
		if (i < ac.n) {
			ev->frames[i].stream = s->ack_hi[i];
			ev->frames[i].offset = s->ack_lo[i];
		}
	}
	bpf_ringbuf_submit(ev, BPF_RB_FORCE_WAKEUP);
	count(FR_MQ_ACKS_ABSORBED);
	return TC_ACT_SHOT;
}

SEC("tc")
int fr_moq_ingress(struct __sk_buff *skb)
{
	struct fr_udp_pkt p = {};
	struct fr_moq_config *cfg;
	struct fr_moq_upconn *up;
	struct fr_moq_cid cid;
	struct scratch *s;
	struct parse_ctx pc = {};
	struct fan_ctx fc = { .skb = skb };
	struct classify_ctx cc = {};
	__u32 zero = 0, j, plen;
	__u8 first;
	__u64 tag[2];

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!cfg || !cfg->enabled || skb->pkt_type != FR_PACKET_HOST)
		return TC_ACT_UNSPEC;
	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.fragment || p.dport != cfg->port)
		return TC_ACT_UNSPEC;
	plen = p.udp_len - sizeof(struct udphdr);
	if (plen < SHORT_HDR_LEN + FR_MOQ_TAG_LEN)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr), &first, 1) ||
	    (first & 0xc0) != 0x40)                       /* not a short-header packet */
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr) + 1, &cid, sizeof(cid)))
		return TC_ACT_UNSPEC;
	up = bpf_map_lookup_elem(&fr_moq_up, &cid);
	if (!up)
		return absorb_ack(skb, &p, plen, first, &cid);
	count(FR_MQ_RX);
	if (p.family != up->family || p.sport != up->peer_port ||
	    __builtin_memcmp(p.saddr, up->peer_ip, 16)) {
		count(FR_MQ_PASS_SPOOFED);
		return TC_ACT_UNSPEC;
	}
	if (plen > FR_MOQ_MAX_PAYLOAD || skb->gso_segs > 1 || skb->gso_size) {
		count(FR_MQ_PASS_OVERSIZE);
		return TC_ACT_UNSPEC;
	}
	if ((first & 0x03) != 0x01) {                    /* fastrelay peers send 2-byte numbers */
		count(FR_MQ_PASS_UNPARSED);
		return TC_ACT_UNSPEC;
	}
	s = bpf_map_lookup_elem(&fr_moq_scratch, &zero);
	if (!s)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr), s->in, plen))
		return TC_ACT_UNSPEC;
	tag[0] = *(__u64 *)&s->in[BOUNDED(plen - FR_MOQ_TAG_LEN, MASK)];
	tag[1] = *(__u64 *)&s->in[BOUNDED(plen - 8, MASK)];
	if (tag[0] || tag[1]) {                            /* not identity protection */
		count(FR_MQ_PASS_BAD_TAG);
		return TC_ACT_UNSPEC;
	}
	*(__u32 *)&s->in[BOUNDED(plen, MASK)] = 0;                /* zero padding for checksums */

	s->up = up->id;
	s->payload_len = plen;
	s->nframes = 0;
	s->armed = 0;
	pc.s = s;
	pc.off = SHORT_HDR_LEN;
	pc.end = plen - FR_MOQ_TAG_LEN;
	bpf_loop(FR_MOQ_BUF, parse_one, &pc, 0);
	if (pc.err || pc.skip_v) {
		count(FR_MQ_PASS_UNPARSED);
		return TC_ACT_UNSPEC;
	}

	cc.s = s;
	bpf_loop(FR_MOQ_MAX_FRAMES, classify_one, &cc, 0);
	if (!cc.ntracks)
		return TC_ACT_UNSPEC;

	fc.s = s;
	for (j = 0; j < FR_MOQ_MAX_TRACKS; j++) {
		__u32 t;

		if (j >= cc.ntracks)
			break;
		t = cc.tracks[j];
		fc.set = bpf_map_lookup_elem(&fr_moq_tracks, &t);
		if (!fc.set || !fc.set->count)
			continue;
		fc.count = fc.set->count;
		s->track = t;
		bpf_loop(FR_MOQ_MAX_SUBS, clone_one, &fc, 0);
	}
	s->armed = 0;
	if (fc.clones) {
		count(FR_MQ_FANNED);
		count_n(FR_MQ_CLONES, fc.clones);
	}
	return TC_ACT_UNSPEC;        /* the original goes up to the relay's socket */
}

/* ---------------------------------------------------------------- egress: build a subscriber's packet */
struct build_ctx {
	struct scratch *s;
	struct fr_moq_conn *conn;
	struct fr_moq_state *st;
	struct fr_moq_event *ev;
	__u64 alias;
	__u32 slot;
	__u32 pos;                   /* next byte in s->out */
	__u32 limit;                 /* largest payload (tag included) */
	__u8 alias_len;
	__u8 nout;
};

static __always_inline void copy_in(struct build_ctx *c, __u32 from, __u32 n)
{
	struct scratch *s = c->s;

	n = BOUNDED(n, MASK);
	bpf_probe_read_kernel(&s->out[BOUNDED(c->pos, MASK)], n, &s->in[BOUNDED(from, MASK)]);
	c->pos += n;
}

static __always_inline void handover(struct build_ctx *c, struct pframe *f, struct fr_moq_dstream *ds,
				     __u8 state, __u32 counter)
{
	struct fr_moq_event *ev;

	ds->state = state;
	ds->handover = f->offset;
	count(counter);
	ev = bpf_ringbuf_reserve(&fr_moq_events, sizeof(*ev), 0);
	if (!ev) {
		count(FR_MQ_RINGBUF_FULL);   /* userspace finds the state in fr_moq_dstream */
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = FR_MOQ_EV_HANDOVER;
	ev->state = state;
	ev->slot = c->slot;
	ev->gen = c->conn->gen;
	ev->up = c->s->up;
	ev->track = f->track;
	ev->group = f->group;
	ev->priority = f->priority;
	ev->time_ns = bpf_ktime_get_ns();
	ev->frames[0].stream = ds->stream;
	ev->frames[0].up_stream = f->stream;
	ev->frames[0].up_offset = f->offset;
	ev->frames[0].offset = f->offset ? f->offset + ds->delta : 0;
	bpf_ringbuf_submit(ev, rb_lazy());
}

/* A new subgroup for this subscriber: open a stream for it, or skip it whole. */
static __always_inline struct fr_moq_dstream *open_stream(struct build_ctx *c, struct pframe *f,
							   struct fr_moq_stream_key *key)
{
	struct fr_moq_dstream ds = { .limit = c->conn->stream_window, .priority = f->priority };
	__u64 sid;

	if (f->offset != 0 || !f->fresh) {     /* joined after the stream began: userspace's */
		ds.state = FR_MOQ_DS_NOT_JOINED;
		count(FR_MQ_NOT_JOINED);
	} else if (f->priority > c->conn->protect_priority &&
		   (c->st->budget < c->conn->skip_below ||
		    c->st->next_stream + 4 * FR_MOQ_STREAM_RESERVE >= c->conn->max_stream)) {
		/* congested, or short of stream credit: the last streams are kept for protected subgroups */
		ds.state = FR_MOQ_DS_SKIPPED;
		count(FR_MQ_SKIP_CONGESTION);
	} else {
		sid = c->st->next_stream;
		if (sid >= c->conn->max_stream) {
			ds.state = FR_MOQ_DS_SKIPPED;
			count(FR_MQ_SKIP_STREAM_LIMIT);
		} else if (__sync_val_compare_and_swap(&c->st->next_stream, sid, sid + 4) != sid) {
			ds.state = FR_MOQ_DS_USER;   /* raced with userspace: it opens the stream */
			ds.handover = 0;
		} else {
			ds.state = FR_MOQ_DS_FORWARD;
			ds.stream = sid;
			ds.delta = (__s32)c->alias_len - (__s32)f->alias_len;
		}
	}
	if (bpf_map_update_elem(&fr_moq_dstream, key, &ds, BPF_NOEXIST))
		return NULL;
	return bpf_map_lookup_elem(&fr_moq_dstream, key);
}

static long build_one(__u32 i, void *data)
{
	struct build_ctx *c = data;
	struct scratch *s = c->s;
	struct pframe *f;
	struct fr_moq_frame_rec *rec;
	struct fr_moq_dstream *ds = NULL;
	struct fr_moq_stream_key key;
	__u64 sid, down_off, dlen;
	__u32 hdr, rest;
	__u8 type;

	if (i >= FR_MOQ_MAX_FRAMES || i >= s->nframes)
		return 1;
	f = &s->frames[BOUNDED(i, FR_MOQ_MAX_FRAMES - 1)];
	if (f->kind == FK_NONE || f->track != s->track)
		return 0;

	if (f->kind == FK_STREAM) {
		key.conn = c->slot;
		key.up = s->up;
		key.stream = f->stream;
		ds = bpf_map_lookup_elem(&fr_moq_dstream, &key);
		if (!ds)
			ds = open_stream(c, f, &key);
		if (!ds || ds->state != FR_MOQ_DS_FORWARD)
			return 0;
		if (c->st->budget < c->conn->skip_below && f->priority > c->conn->protect_priority) {
			/* congested: a started low-priority subgroup goes no further (userspace resets it);
			 * protected ones (keyframes: small, and what the rest depends on) keep going */
			handover(c, f, ds, FR_MOQ_DS_ABANDONED, FR_MQ_ABANDONED);
			return 0;
		}
		sid = ds->stream;
		down_off = f->offset ? f->offset + ds->delta : 0;
		dlen = f->offset || !f->alias_len ? f->len : f->len + ds->delta;
		if (down_off + dlen > ds->limit || c->st->credit < (__s64)dlen) {
			handover(c, f, ds, FR_MOQ_DS_USER, FR_MQ_HANDOVER_FLOW);
			return 0;
		}
		type = 0x08 | 0x02 | (down_off ? 0x04 : 0) | (f->fin ? 0x01 : 0);
		hdr = 1 + varint_len(sid) + (down_off ? varint_len(down_off) : 0) + varint_len(dlen);
	} else {
		sid = DATAGRAM_STREAM;
		down_off = 0;
		dlen = f->len - f->alias_len + c->alias_len;
		type = 0x31;
		hdr = 1 + varint_len(dlen);
	}
	if (c->pos + hdr + dlen + FR_MOQ_TAG_LEN > c->limit || c->nout >= FR_MOQ_MAX_FRAMES) {
		if (ds)
			handover(c, f, ds, FR_MOQ_DS_USER, FR_MQ_HANDOVER_SIZE);
		return 0;                /* a datagram that does not fit is dropped, as QUIC may */
	}

	s->out[BOUNDED(c->pos, 2 * FR_MOQ_BUF - 1)] = type;
	c->pos++;
	if (f->kind == FK_STREAM) {
		put_varint(s->out, c->pos, sid, varint_len(sid));
		c->pos += varint_len(sid);
		if (down_off) {
			put_varint(s->out, c->pos, down_off, varint_len(down_off));
			c->pos += varint_len(down_off);
		}
	}
	put_varint(s->out, c->pos, dlen, varint_len(dlen));
	c->pos += varint_len(dlen);
	if (f->alias_len && (f->offset == 0 || f->kind == FK_DATAGRAM)) {
		/* type varint as it was, the subscriber's alias, the rest as it was */
		copy_in(c, f->data_off, f->alias_off - f->data_off);
		put_varint(s->out, c->pos, c->alias, c->alias_len);
		c->pos += c->alias_len;
		rest = f->data_off + f->len - f->alias_off - f->alias_len;
		copy_in(c, f->alias_off + f->alias_len, rest);
	} else {
		copy_in(c, f->data_off, f->len);
	}
	if (f->kind == FK_STREAM)
		__sync_fetch_and_add(&c->st->credit, -(__s64)dlen);

	rec = &c->ev->frames[BOUNDED(c->nout, FR_MOQ_MAX_FRAMES - 1)];
	rec->stream = sid;
	rec->offset = down_off;
	rec->up_stream = f->stream;
	rec->up_offset = f->offset;
	rec->len = dlen;
	rec->fin = f->fin;
	c->nout++;
	return 0;
}

static __always_inline __s64 sum_region(__u8 *buf, __u32 len, __s64 seed, int negate)
{
	__u32 n = (len + 3) & ~3U, k;
	__s64 sum = seed;

#pragma unroll
	for (k = 0; k < 4; k++) {
		__u32 chunk;

		if (k * 512 >= n)
			break;
		chunk = n - k * 512;
		if (chunk > 512)
			chunk = 512;
		chunk &= 0x3fc;
		if (negate)
			sum = bpf_csum_diff((__be32 *)(buf + k * 512), chunk, NULL, 0, sum);
		else
			sum = bpf_csum_diff(NULL, 0, (__be32 *)(buf + k * 512), chunk, sum);
		if (sum < 0)
			return sum;
	}
	return sum;
}

/* Turn the clone of an upstream packet into a packet of connection `slot`. */
static __always_inline int build_clone(struct __sk_buff *skb, struct scratch *s, __u32 slot,
				       struct fr_moq_config *cfg)
{
	struct build_ctx c = { .s = s, .slot = slot };
	struct fr_moq_dsub_key dkey = { .conn = slot, .track = s->track };
	struct fr_moq_dsub *dsub;
	struct fr_udp_pkt p = {};
	struct fr_moq_event *ev;
	__u32 l4, len, wlen, old_len = s->payload_len, csum_off;
	__u64 pn, flags0 = BPF_F_MARK_MANGLED_0;
	__s64 diff;
	__u8 macs[12];

	c.conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	c.st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	dsub = bpf_map_lookup_elem(&fr_moq_dsub, &dkey);
	if (!c.conn || !c.st || !c.conn->gen || !dsub) {
		count(FR_MQ_DROP_EMPTY);
		return TC_ACT_SHOT;
	}
	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.family != c.conn->family) {
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	ev = bpf_ringbuf_reserve(&fr_moq_events, sizeof(*ev), 0);
	if (!ev) {
		count(FR_MQ_RINGBUF_FULL);
		return TC_ACT_SHOT;
	}
	c.ev = ev;
	c.alias = dsub->alias;
	c.alias_len = varint_len(dsub->alias);
	c.limit = c.conn->max_payload < FR_MOQ_MAX_PAYLOAD ? c.conn->max_payload : FR_MOQ_MAX_PAYLOAD;
	c.pos = SHORT_HDR_LEN;
	bpf_loop(FR_MOQ_MAX_FRAMES, build_one, &c, 0);
	if (!c.nout) {
		bpf_ringbuf_discard(ev, 0);
		count(FR_MQ_DROP_EMPTY);
		return TC_ACT_SHOT;
	}

	/* short header, identity tag, zero padding for the checksum */
	len = c.pos + FR_MOQ_TAG_LEN;
	if (len > FR_MOQ_MAX_PAYLOAD || len < SHORT_HDR_LEN) {
		bpf_ringbuf_discard(ev, 0);
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	__builtin_memset(&s->out[BOUNDED(c.pos, MASK)], 0, 4);
	__builtin_memset(&s->out[BOUNDED(c.pos + 4, MASK)], 0, 4);
	__builtin_memset(&s->out[BOUNDED(c.pos + 8, MASK)], 0, 4);
	__builtin_memset(&s->out[BOUNDED(c.pos + 12, MASK)], 0, 4);
	__builtin_memset(&s->out[BOUNDED(c.pos + 16, MASK)], 0, 4);
	pn = __sync_fetch_and_add(&c.st->next_pn, 1);
	s->out[0] = 0x41;
	__builtin_memcpy(&s->out[1], c.conn->dcid, FR_MOQ_CID_LEN);
	s->out[1 + FR_MOQ_CID_LEN] = pn >> 8;
	s->out[2 + FR_MOQ_CID_LEN] = pn;

	/* checksum: the payload difference, then headers (PARTIAL-aware helpers) */
	l4 = p.l4_off;
	csum_off = l4 + offsetof(struct udphdr, check);
	diff = sum_region(s->in, old_len, 0, 1);
	if (diff >= 0)
		diff = sum_region(s->out, len, diff, 0);
	if (diff < 0 || bpf_skb_change_tail(skb, l4 + sizeof(struct udphdr) + len, 0))
		goto err;
	wlen = BOUNDED(len, MASK);
	if (wlen < 1 || bpf_skb_store_bytes(skb, l4 + sizeof(struct udphdr), s->out, wlen, 0))
		goto err;
	if ((p.family == FR_AF_INET6 || p.csum) && bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0))
		goto err;
	{
		__be16 old[2] = { bpf_htons(old_len + 8), 0 }, new[2] = { bpf_htons(len + 8), 0 };
		__be16 ports[2] = { c.conn->src_port, c.conn->dst_port }, oports[2] = { p.sport, p.dport };
		__u64 pflags = BPF_F_PSEUDO_HDR | flags0 | (p.family == FR_AF_INET6 ? cfg->csum_v6_flags : 0);

		if (p.family == FR_AF_INET6 || p.csum) {
			/* UDP length: once in the header, once in the pseudo header */
			diff = bpf_csum_diff((__be32 *)old, 4, (__be32 *)new, 4, 0);
			if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0) ||
			    bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
				goto err;
			diff = bpf_csum_diff((__be32 *)oports, 4, (__be32 *)ports, 4, 0);
			if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0))
				goto err;
		}
		if (bpf_skb_store_bytes(skb, l4, ports, 4, 0) ||
		    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, len), &new[0], 2, 0))
			goto err;

		if (p.family == FR_AF_INET) {
			__u32 oaddr[2], naddr[2];
			__be16 olen = bpf_htons(p.l3_len), nlen = bpf_htons(20 + 8 + len);
			__be16 ottl, nttl;

			__builtin_memcpy(&oaddr[0], p.saddr, 4);
			__builtin_memcpy(&oaddr[1], p.daddr, 4);
			__builtin_memcpy(&naddr[0], c.conn->src_ip, 4);
			__builtin_memcpy(&naddr[1], c.conn->dst_ip, 4);
			diff = bpf_csum_diff(oaddr, 8, naddr, 8, 0);
			if (diff < 0 || bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), 0, diff, 0))
				goto err;
			if (p.csum && bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
				goto err;
			if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), olen, nlen, 2) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, tot_len), &nlen, 2, 0))
				goto err;
			if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &ottl, 2))
				goto err;
			nttl = ottl;
			*(__u8 *)&nttl = FR_TTL;
			if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), ottl, nttl, 2) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &nttl, 2, 0) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), naddr, 8, 0))
				goto err;
		} else {
			__u8 oaddr[32], naddr[32];
			__be16 plen6 = bpf_htons(8 + len);
			__u8 hl = FR_TTL;

			__builtin_memcpy(oaddr, p.saddr, 16);
			__builtin_memcpy(oaddr + 16, p.daddr, 16);
			__builtin_memcpy(naddr, c.conn->src_ip, 16);
			__builtin_memcpy(naddr + 16, c.conn->dst_ip, 16);
			diff = bpf_csum_diff((__be32 *)oaddr, 32, (__be32 *)naddr, 32, 0);
			if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
				goto err;
			if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, payload_len), &plen6, 2, 0) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, hop_limit), &hl, 1, 0) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), naddr, 32, 0))
				goto err;
		}
	}
	__builtin_memcpy(macs, c.conn->dst_mac, 6);
	__builtin_memcpy(macs + 6, c.conn->src_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		goto err;

	__sync_fetch_and_add(&c.st->budget, -(__s64)len);
	__sync_fetch_and_add(&c.st->packets, 1);
	__sync_fetch_and_add(&c.st->bytes, len);
	ev->kind = FR_MOQ_EV_SENT;
	ev->nframes = c.nout;
	ev->slot = slot;
	ev->gen = c.conn->gen;
	ev->bytes = len;
	ev->pn = pn;
	ev->time_ns = bpf_ktime_get_ns();
	ev->track = s->track;
	ev->up = s->up;
	bpf_ringbuf_submit(ev, rb_lazy());
	count(FR_MQ_SENT);
	count_n(FR_MQ_SENT_BYTES, len);
	return TC_ACT_OK;
err:
	/* the number is spent: report the packet as sent with no frames (never acknowledged) */
	ev->kind = FR_MOQ_EV_SENT;
	ev->nframes = 0;
	ev->slot = slot;
	ev->gen = c.conn->gen;
	ev->pn = pn;
	ev->time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(ev, rb_lazy());
	count(FR_MQ_ERR);
	return TC_ACT_SHOT;
}

/* A packet userspace sent on a kernel-path connection: its number comes from the shared counter. */
static __always_inline int renumber(struct __sk_buff *skb, struct fr_moq_config *cfg)
{
	struct fr_udp_pkt p = {};
	struct fr_moq_cid cid;
	struct fr_moq_slot *sl;
	struct fr_moq_state *st;
	struct fr_moq_event *ev;
	__u32 off, slot;
	__u8 word[4], nword[4];
	__u16 local;
	__u64 pn;
	__u8 first;

	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.fragment || p.sport != cfg->port)
		return TC_ACT_UNSPEC;
	off = p.l4_off + sizeof(struct udphdr);
	if (bpf_skb_load_bytes(skb, off, &first, 1) || (first & 0xc0) != 0x40 ||
	    bpf_skb_load_bytes(skb, off + 1, &cid, sizeof(cid)))
		return TC_ACT_UNSPEC;
	sl = bpf_map_lookup_elem(&fr_moq_dcid, &cid);
	if (!sl)
		return TC_ACT_UNSPEC;
	slot = sl->slot;
	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	if (!st || (first & 0x03) != 0x01 || skb->gso_segs > 1 || skb->gso_size) {
		count(FR_MQ_ERR);    /* cannot renumber: the packet would collide, drop it (QUIC retransmits) */
		return TC_ACT_SHOT;
	}
	ev = bpf_ringbuf_reserve(&fr_moq_events, sizeof(*ev), 0);
	if (!ev) {
		count(FR_MQ_RINGBUF_FULL);
		return TC_ACT_SHOT;
	}
	/* the number sits at an odd offset of the datagram: update the checksum over the
	 * aligned 4 bytes around it (last CID byte, number, first frame byte) */
	if (bpf_skb_load_bytes(skb, off + FR_MOQ_CID_LEN, word, 4)) {
		bpf_ringbuf_discard(ev, 0);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(nword, word, 4);
	pn = __sync_fetch_and_add(&st->next_pn, 1);
	local = ((__u16)word[1] << 8) | word[2];
	nword[1] = pn >> 8;
	nword[2] = pn;
	if ((p.family == FR_AF_INET6 || p.csum) &&
	    bpf_l4_csum_replace(skb, p.l4_off + offsetof(struct udphdr, check), *(__u32 *)word, *(__u32 *)nword,
				4 | BPF_F_MARK_MANGLED_0))
		goto err;
	if (bpf_skb_store_bytes(skb, off + FR_MOQ_CID_LEN, nword, 4, 0))
		goto err;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = FR_MOQ_EV_RENUMBERED;
	ev->slot = slot;
	ev->gen = sl->gen;
	ev->bytes = p.udp_len - sizeof(struct udphdr);
	ev->pn = pn;
	ev->local_pn = local;
	ev->time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(ev, rb_lazy());
	__sync_fetch_and_add(&st->renumbered, 1);
	count(FR_MQ_RENUMBERED);
	return TC_ACT_UNSPEC;
err:
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = FR_MOQ_EV_SENT;   /* a spent number, never acknowledged */
	ev->slot = slot;
	ev->gen = sl->gen;
	ev->pn = pn;
	bpf_ringbuf_submit(ev, rb_lazy());
	count(FR_MQ_ERR);
	return TC_ACT_SHOT;
}

SEC("tc")
int fr_moq_egress(struct __sk_buff *skb)
{
	struct fr_moq_config *cfg;
	struct scratch *s;
	__u32 zero = 0, slot;

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!cfg || !cfg->enabled)
		return TC_ACT_UNSPEC;
	s = bpf_map_lookup_elem(&fr_moq_scratch, &zero);
	if (s && s->armed) {
		slot = s->armed - 1;
		s->armed = 0;            /* only this clone: a nested packet is not ours */
		return build_clone(skb, s, slot, cfg);
	}
	return renumber(skb, cfg);
}

/* ---------------------------------------------------------------- userspace's atomic changes */
SEC("syscall")
int fr_moq_take(struct fr_moq_take_args *a)
{
	struct fr_moq_state *st;
	__u32 slot = a->slot;
	__u64 old;

	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	if (!st)
		return -1;
	switch (a->op) {
	case FR_MOQ_TAKE_PN:
		a->result = __sync_fetch_and_add(&st->next_pn, a->value);
		return 0;
	case FR_MOQ_TAKE_STREAM:
		a->result = __sync_fetch_and_add(&st->next_stream, 4 * a->value);
		return 0;
	case FR_MOQ_ADD_BUDGET:
		a->result = __sync_fetch_and_add(&st->budget, a->value);
		return 0;
	case FR_MOQ_ADD_CREDIT:
		a->result = __sync_fetch_and_add(&st->credit, a->value);
		return 0;
	case FR_MOQ_SET_PN:
		old = st->next_pn;
		for (int i = 0; i < 16 && old < (__u64)a->value; i++) {
			__u64 seen = __sync_val_compare_and_swap(&st->next_pn, old, a->value);

			if (seen == old)
				break;
			old = seen;
		}
		a->result = old;
		return 0;
	}
	return -1;
}
