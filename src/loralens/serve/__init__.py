"""Screening adapters for people: ``app`` (the HTTP service behind ``loralens serve``; needs
the ``serve`` extra), ``batch`` (``loralens screen`` over a folder), ``workers`` (the processes
that read untrusted files), ``jobs`` (what a worker does), ``unpack`` and ``upload`` (the rules
for untrusted input) and ``report`` (the page and the HTML report)."""
