"""Margin-softmax losses over sampled class subsets: the functional losses, the
margin family, the head with its sparse optimizer, and its class-sharded form."""
