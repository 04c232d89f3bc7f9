"""
The response cache (issue 9): keys (L{clawproxy.cache.keys}), entries and
their stores (L{clawproxy.cache.store}), request coalescing
(L{clawproxy.cache.coalesce}); the data-plane parts that use them are in
L{clawproxy.web.cache}.
"""
