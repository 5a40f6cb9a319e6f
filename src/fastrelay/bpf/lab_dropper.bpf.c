// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Random packet loss for lab links (this kernel has no netem): attached to a TC hook,
 * drops each data packet with probability threshold / 2^32. Neighbour discovery (ARP,
 * ICMPv6 router/neighbour messages) is never dropped: a lost ARP reply would stall the
 * link for a second and turn "5% random loss" into a burst outage.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fastrelay.h"

#define FR_IPPROTO_ICMPV6 58
#define ICMPV6_ND_FIRST 133          /* router solicitation */
#define ICMPV6_ND_LAST 137           /* redirect */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

FR_EXPORT_BTF(enum fr_drop_counter, drop_counter);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fr_drop_config);
} fr_drop_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FR_DC_MAX);
	__type(key, __u32);
	__type(value, __u64);
} fr_drop_stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&fr_drop_stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline int is_neighbour_discovery(struct __sk_buff *skb)
{
	__u8 nexthdr, type;

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return 1;
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &nexthdr, 1) || nexthdr != FR_IPPROTO_ICMPV6)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 40, &type, 1))
		return 0;
	return type >= ICMPV6_ND_FIRST && type <= ICMPV6_ND_LAST;
}

SEC("tc")
int fr_lab_drop(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct fr_drop_config *cfg = bpf_map_lookup_elem(&fr_drop_cfg, &zero);

	if (is_neighbour_discovery(skb))
		return TC_ACT_UNSPEC;
	count(FR_DC_SEEN);
	if (cfg && bpf_get_prandom_u32() < cfg->threshold) {
		count(FR_DC_DROPPED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}
