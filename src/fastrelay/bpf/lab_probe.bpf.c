// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * One-way delay probes for the lab (same clock on both sides: bpf_ktime_get_ns).
 *
 * fr_probe_tx (TC egress of the publisher): remembers when each tagged packet left.
 * fr_probe_rx (TC ingress of each subscriber): looks the packet's seq up, adds the
 * delay to the receiver's log-linear histogram and counts packets and bytes; in sink
 * mode it drops the packet afterwards so benchmarks need no receiving process.
 * Aggregation stays in the kernel; userspace reads finished histograms.
 */
#include "fr_packet.h"
#include "fastrelay.h"
#include <linux/pkt_cls.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

FR_EXPORT_BTF(enum fr_tag_magic, tag_magic);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fr_probe_config);
} fr_probe_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_PROBE_TS_SLOTS);
	__type(key, __u32);
	__type(value, struct fr_probe_ts);
} fr_probe_ts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FR_PROBE_SLOTS);
	__type(key, struct fr_probe_mac);
	__type(value, __u32);
} fr_probe_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FR_PROBE_SLOTS);
	__type(key, __u32);
	__type(value, struct fr_probe_hist);
} fr_probe_hist SEC(".maps");

static __always_inline __u32 msb64(__u64 d)
{
	__u32 msb = 0;

	if (d >> 32) { msb += 32; d >>= 32; }
	if (d >> 16) { msb += 16; d >>= 16; }
	if (d >> 8) { msb += 8; d >>= 8; }
	if (d >> 4) { msb += 4; d >>= 4; }
	if (d >> 2) { msb += 2; d >>= 2; }
	if (d >> 1) { msb += 1; }
	return msb;
}

/*
 * Log-linear delay bucket: exact below 16 ns, then 16 buckets per power of two
 * (each at most 6.25% wide); fastrelay.lab.probe decodes it.
 */
static __always_inline __u32 bucket_of(__u64 d)
{
	__u32 msb, idx;

	if (d < 16)
		return d;
	msb = msb64(d);
	idx = (msb - 3) * 16 + ((d >> (msb - 4)) & 15);
	return idx < FR_HIST_BUCKETS ? idx : FR_HIST_BUCKETS - 1;
}

/* Scratch for scanning probes: the payload, searched for the tag's magic. */
struct scan_buf {
	__u8 b[2048 + 16];           /* indices are masked with 2047 */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scan_buf);
} fr_probe_scratch SEC(".maps");

struct scan_ctx {
	struct scan_buf *buf;
	__u32 len;
	__s32 found;
};

static long scan_one(__u32 i, void *data)
{
	struct scan_ctx *c = data;
	if (i + sizeof(struct fr_tag) > c->len)
		return 1;
	if (*(__u32 *)&c->buf->b[i & 2047] == FR_TAG_MAGIC) {
		c->found = i;
		return 1;
	}
	return 0;
}

/* Read the tag of a tagged UDP packet; 0 on success. */
static __always_inline int read_tag(struct __sk_buff *skb, struct fr_udp_pkt *p, struct fr_tag *tag)
{
	__u32 zero = 0;
	struct fr_probe_config *cfg = bpf_map_lookup_elem(&fr_probe_cfg, &zero);
	struct scan_ctx sc = { .found = -1 };
	__u32 off, len;

	if (!cfg || fr_parse_udp(skb, p) != FR_PARSE_OK || p->fragment)
		return -1;
	off = p->l4_off + sizeof(struct udphdr) + cfg->tag_offset;
	if (off > 0xffff)
		return -1;
	if (cfg->scan) {
		len = p->udp_len - sizeof(struct udphdr);
		len = len > cfg->tag_offset ? len - cfg->tag_offset : 0;
		len = len < cfg->scan ? len : cfg->scan;
		if (len > FR_PROBE_SCAN_MAX)
			len = FR_PROBE_SCAN_MAX;
		if (len < sizeof(*tag))
			return -1;
		sc.buf = bpf_map_lookup_elem(&fr_probe_scratch, &zero);
		if (!sc.buf || bpf_skb_load_bytes(skb, off, sc.buf->b, len))
			return -1;
		sc.len = len;
		bpf_loop(FR_PROBE_SCAN_MAX, scan_one, &sc, 0);
		if (sc.found < 0)
			return -1;
		off += sc.found;
	}
	if (bpf_skb_load_bytes(skb, off, tag, sizeof(*tag)))
		return -1;
	return tag->magic == FR_TAG_MAGIC ? 0 : -1;
}

SEC("tc")
int fr_probe_tx(struct __sk_buff *skb)
{
	__u64 now = bpf_ktime_get_ns();     /* before the (scanning) parse */
	struct fr_udp_pkt p = {};
	struct fr_tag tag;
	struct fr_probe_ts *slot;
	__u32 idx;

	if (read_tag(skb, &p, &tag))
		return TC_ACT_UNSPEC;
	idx = tag.seq & (FR_PROBE_TS_SLOTS - 1);
	slot = bpf_map_lookup_elem(&fr_probe_ts, &idx);
	if (slot) {
		slot->ts_ns = now;
		slot->seq = tag.seq;
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int fr_probe_rx(struct __sk_buff *skb)
{
	__u64 now = bpf_ktime_get_ns();
	struct fr_udp_pkt p = {};
	struct fr_probe_mac mac = {};
	struct fr_probe_config *cfg;
	struct fr_probe_hist *h;
	struct fr_probe_ts *sent;
	struct fr_tag tag;
	__u32 zero = 0, idx, *slot;

	if (read_tag(skb, &p, &tag))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 0, mac.addr, sizeof(mac.addr)))
		return TC_ACT_UNSPEC;
	slot = bpf_map_lookup_elem(&fr_probe_slots, &mac);
	if (!slot)
		return TC_ACT_UNSPEC;
	h = bpf_map_lookup_elem(&fr_probe_hist, slot);
	if (!h)
		return TC_ACT_UNSPEC;
	h->packets++;
	h->bytes += p.l3_len;

	idx = tag.seq & (FR_PROBE_TS_SLOTS - 1);
	sent = bpf_map_lookup_elem(&fr_probe_ts, &idx);
	if (sent && sent->seq == tag.seq && sent->ts_ns && now >= sent->ts_ns) {
		__u64 d = now - sent->ts_ns;
		__u32 b = bucket_of(d);

		if (b < FR_HIST_BUCKETS)
			h->buckets[b]++;
		h->matched++;
		if (d > h->max_ns)
			h->max_ns = d;
	}
	cfg = bpf_map_lookup_elem(&fr_probe_cfg, &zero);
	return cfg && cfg->sink ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
