"""The policies every stage may import, and nothing else: device and dtype (``device``), the
causal-LM loss and perplexity (``losses``), peak memory (``memory``), rank and world (``ranks``),
file hashing (``hashing``) and child-process supervision (``processes``). ``core`` imports no
stage of lmref."""
