"""Margin-softmax losses over sampled class subsets: the functional losses, the
margin family, the head with its sparse optimizer, and its class-sharded form.

Modules, in dependency order (docs/margin_softmax.md, "Code layout"):
sampling, checks, gemm, engine (the fused block engine and its options), ops
(custom ops and autograd), functional, family, head, sharded."""
