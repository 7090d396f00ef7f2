"""Head-level circuit discovery (``attnlab.circuits``).

- `tasks`: clean/corrupted tasks (IOI, induction, greater-than, JSONL) with a logit-difference metric;
- `patching`: exact activation patching and attribution patching (EAP nodes and edges, EAP-IG);
- `faithfulness`: MIB faithfulness curves, the smallest faithful circuit, completeness;
- `circuit`: circuit selection, the run's circuit file (read and checked in one place), a plotly graph,
  protected heads for policies;
- `toy`: a two-layer attention-only model trained to do induction (a circuit known in advance);
- `cli`: ``attnlab circuit``.
"""
