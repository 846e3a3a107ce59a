"""MIG logic: profiles, canonical names, counters, GI/CI lifecycle over a narrow protocol.

Never imports driver.
"""
