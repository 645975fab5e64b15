"""The generic MoE decoder: layers, routers, MoE block and per-family specs."""
