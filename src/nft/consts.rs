//! Kernel uapi numbers (linux/netfilter/nf_tables.h, linux/netlink.h) that the code names.
//! Kept here, spelled as in the headers, so that encoding code reads like the kernel's own.

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWGEN: u16 = 15;
pub const NFT_MSG_GETGEN: u16 = 16;

// Message attributes (linux/netfilter/nf_tables.h) the read-back and raw messages use.
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
/// Chains, sets, objects and flowtables in the table.
pub const NFTA_TABLE_USE: u16 = 3;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_SET_DESC: u16 = 9;
pub const NFTA_SET_DESC_SIZE: u16 = 1;
pub const NFTA_SET_TIMEOUT: u16 = 11;
pub const NFTA_SET_EXPR: u16 = 17;
pub const NFTA_SET_EXPRESSIONS: u16 = 18;
pub const NFTA_OBJ_TABLE: u16 = 1;
pub const NFTA_OBJ_NAME: u16 = 2;
pub const NFTA_OBJ_TYPE: u16 = 3;
pub const NFTA_GEN_ID: u16 = 1;
pub const NFT_MSG_GETOBJ: u16 = 19;
pub const NFT_MSG_DELOBJ: u16 = 20;
/// An anonymous chain bound to the rule that jumps to it.
pub const NFT_CHAIN_BINDING: u32 = 0x4;

pub const NFPROTO_INET: u16 = 1;
pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;

pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_FORWARD: u32 = 2;
pub const NF_INET_LOCAL_OUT: u32 = 3;
pub const NF_INET_POST_ROUTING: u32 = 4;

pub const NFT_REG_VERDICT: u32 = 0;
pub const NFT_REG_1: u32 = 1;
pub const NFT_REG_2: u32 = 2;
/// First 32-bit register: concatenations are built in consecutive 32-bit registers from here.
pub const NFT_REG32_00: u32 = 8;

pub const NFT_META_MARK: u32 = 3;
pub const NFT_CT_STATE: u32 = 0;
pub const NFT_CT_STATUS: u32 = 2;
/// `IPS_DST_NAT` in `ct status`: the connection's destination was translated.
pub const IPS_DST_NAT: u32 = 1 << 5;
pub const NFT_CT_DST_IP: u32 = 20;
pub const NFT_CT_DST_IP6: u32 = 22;
pub const IP_CT_DIR_ORIGINAL: u32 = 0;
/// conntrack state bit for INVALID (host byte order).
pub const NF_CT_STATE_INVALID_BIT: u32 = 1;
pub const NFT_CMP_NEQ: u32 = 1;
pub const NF_DROP: i32 = 0;
pub const NFT_META_NFPROTO: u32 = 15;
pub const NFT_META_L4PROTO: u32 = 16;

pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

pub const NFT_CMP_EQ: u32 = 0;
pub const NFT_CMP_LT: u32 = 2;

pub const NFT_JUMP: i32 = -3;
pub const NFT_GOTO: i32 = -4;
pub const NFT_RETURN: i32 = -5;

pub const NFT_SET_MAP: u32 = 0x8;
pub const NF_ACCEPT: u32 = 1;
/// NFT_TABLE_F_DORMANT: the table's hooks are unregistered.
pub const NFT_TABLE_F_DORMANT: u32 = 0x1;
/// Only the netlink socket that created (or adopted) the table may change it.
pub const NFT_TABLE_F_OWNER: u32 = 0x2;
/// With OWNER: the table stays, orphaned, when its owner's socket closes (kernel 6.9+).
pub const NFT_TABLE_F_PERSIST: u32 = 0x4;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NFT_SET_TIMEOUT: u32 = 0x10;
pub const NFT_SET_EVAL: u32 = 0x20;
pub const NFT_DYNSET_OP_UPDATE: u32 = 1;
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

pub const NFT_NAT_DNAT: u32 = 1;
pub const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
pub const NF_NAT_RANGE_MAP_IPS: u32 = 0x1;
pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;

pub const NFT_REJECT_TCP_RST: u32 = 1;
pub const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
pub const NFT_REJECT_ICMPX_PORT_UNREACH: u32 = 1;

pub const NFT_NG_RANDOM: u32 = 1;
pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub const NFTA_FIB_F_SADDR: u32 = 1;
/// RTN_LOCAL: an address of this host (fib's address type, host byte order).
pub const RTN_LOCAL: u32 = 2;
pub const NFT_BYTEORDER_HTON: u32 = 1;

/// nft's datatype ids, used as set key types so that `nft list` prints keys readably.
pub const TYPE_INTEGER: u32 = 4;
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_INET_PROTOCOL: u32 = 12;
pub const TYPE_INET_SERVICE: u32 = 13;
/// nft packs a concatenation's type ids 6 bits apart.
pub const TYPE_BITS: u32 = 6;

pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const SOL_NETLINK: i32 = 270;
pub const NETLINK_CAP_ACK: i32 = 10;

/// Rule user data TLV type for a comment (libnftnl's NFTNL_UDATA_RULE_COMMENT).
pub const UDATA_RULE_COMMENT: u8 = 0;

/// The nfnetlink multicast group of nf_tables events (one message per object a commit changes,
/// then NFT_MSG_NEWGEN).
pub const NFNLGRP_NFTABLES: u32 = 7;
/// NEWGEN attributes: the committing process's pid and name.
pub const NFTA_GEN_PROC_PID: u16 = 2;
pub const NFTA_GEN_PROC_NAME: u16 = 3;
