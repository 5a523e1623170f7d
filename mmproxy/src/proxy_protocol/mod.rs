//! PROXY protocol v1/v2 codec (placeholder).
