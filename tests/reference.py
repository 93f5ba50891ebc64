"""A slow, obvious twin of the count-mode kernel: dicts, sets and sorting, one access at a time.

It follows docs/simulator.md's rules literally so the jitted kernels can be checked against it:
victims are the first resident in policy order that the access semantics allow.
"""

from __future__ import annotations

import math

NEVER = 2**63 - 1


def replay_count_reference(groups, n_obj, part, size, cap, policy, atomic, *, next_use,
                           params=None, profile=None, pinned=(), layer_of=None,
                           priority=None):  # fmt: skip
    """Replay ``groups`` (list of lists of (access index, obj)) and return hits, misses, per-layer.

    part/size: per object; cap: per partition; next_use: per access index.
    priority: for "moe-infinity", ``priority(group index, obj)`` (lowest evicted first, ties
    least recently used first; forced evictions of a group's own experts go in LRU order).
    """
    cur = 0
    params = params or {}
    used = [0] * len(cap)
    resident = {}  # obj -> dict of policy fields
    freq = [0.0] * n_obj
    objnext = [NEVER] * n_obj
    first = {}
    for g in groups:
        for a, o in g:
            first.setdefault(o, a)
    for o, a in first.items():
        objnext[o] = a
    pinned = set(pinned)
    for o in pinned:
        used[part[o]] += size[o]
    clock = 0
    inserts = 0
    events = 0
    hits = misses = 0
    hits_layer = {}

    def order_key(o):
        r = resident[o]
        if policy == "lru":
            return (r["last"],)
        if policy == "fifo":
            return (r["ins"],)
        if policy == "lfu":
            return (r["count"], r["k2"])
        if policy in ("lfu-perfect", "lfu-aged"):
            return (freq[o], r["k2"])
        if policy == "belady":
            return (-float(objnext[o]),)
        if policy == "static":
            return (freq[o], r["k2"])
        if policy == "moe-infinity":
            return (priority(cur, o), r["last"])
        raise ValueError(policy)

    if policy == "lfu-aged":
        freq = [-math.inf] * n_obj

    def bump(o):
        if policy == "lfu-perfect":
            freq[o] += 1.0
        elif policy == "lfu-aged":
            x = clock / params.get("half_life", 1000.0)
            f = freq[o]
            if f == -math.inf:
                f = x
            elif f >= x:
                f = f + math.log2(1.0 + math.pow(2.0, x - f))
            else:
                f = x + math.log2(1.0 + math.pow(2.0, f - x))
            freq[o] = f

    def admit(o):
        nonlocal inserts, events
        inserts += 1
        events += 1
        resident[o] = {"last": events, "ins": inserts, "count": 1.0, "k2": events}
        used[part[o]] += size[o]
        bump(o)

    if policy == "static":
        counts = list(profile)
        for o in range(n_obj):
            freq[o] = counts[o]
        room = list(cap)
        for o in sorted(range(n_obj), key=lambda x: (-counts[x], x)):
            if counts[o] > 0 and size[o] <= room[part[o]]:
                room[part[o]] -= size[o]
                admit(o)

    for gi, g in enumerate(groups):
        cur = gi  # the current group, read by order_key
        members = {o for _, o in g}
        done = set()
        for a, o in g:
            clock += 1
            objnext[o] = next_use[a]
            lay = layer_of[o] if layer_of is not None else 0
            if o in pinned:
                hits += 1
                hits_layer[lay] = hits_layer.get(lay, 0) + 1
            elif o in resident:
                hits += 1
                hits_layer[lay] = hits_layer.get(lay, 0) + 1
                r = resident[o]
                events += 1
                r["last"] = events
                r["count"] += 1.0
                r["k2"] = events
                bump(o)
            else:
                misses += 1
                if policy == "none":
                    pass
                else:
                    p = part[o]
                    ok = True
                    while used[p] + size[o] > cap[p]:
                        cands = sorted((x for x in resident if part[x] == p), key=order_key)
                        v = None
                        if atomic:
                            forced = cands
                            if policy == "moe-infinity":
                                forced = sorted(cands, key=lambda x: resident[x]["last"])
                            passes = (
                                [x for x in cands if x not in members],
                                [x for x in cands if x in done],
                                forced,
                            )
                            v = next((ps[0] for ps in passes if ps), None)
                        else:
                            v = cands[0] if cands else None
                        if v is None:
                            ok = False
                            break
                        del resident[v]
                        used[p] -= size[v]
                    if ok:
                        admit(o)
                    elif policy in ("lfu-perfect", "lfu-aged"):
                        events += 1
                        bump(o)
            done.add(o)
    return hits, misses, hits_layer


def exhaustive_min_misses(groups, cap, atomic):
    """Fewest misses of any demand-caching schedule (tiny inputs only).

    One global partition of ``cap`` unit-size slots; on a miss with a full cache every allowed
    victim is tried (atomic: a non-member if one exists, else a member already used in this
    group, else any).
    """
    best = [math.inf]
    seq = [(gi, o) for gi, g in enumerate(groups) for _, o in g]
    memo = {}

    def rec(i, cache, done, misses):
        if misses >= best[0]:
            return
        if i == len(seq):
            best[0] = misses
            return
        gi, o = seq[i]
        if i > 0 and seq[i - 1][0] != gi:
            done = frozenset()
        key = (i, cache, done)
        if memo.get(key, math.inf) <= misses:
            return
        memo[key] = misses
        if o in cache:
            rec(i + 1, cache, done | {o}, misses)
            return
        if len(cache) < cap:
            rec(i + 1, cache | {o}, done | {o}, misses + 1)
            return
        members = {x for _, x in groups[gi]}
        allowed = list(cache)
        if atomic:
            for pred in (lambda x: x not in members, lambda x: x in done):
                sel = [x for x in cache if pred(x)]
                if sel:
                    allowed = sel
                    break
        for v in allowed:
            rec(i + 1, (cache - {v}) | {o}, done | {o}, misses + 1)

    rec(0, frozenset(), frozenset(), 0)
    return best[0]
