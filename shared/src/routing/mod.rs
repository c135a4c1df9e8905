//! Route selection, path statistics and link-state gossip (sans-IO).
