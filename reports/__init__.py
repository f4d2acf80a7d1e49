"""Running explainers over samples, rendering self-contained HTML reports, building the site,
and the ``xmllm`` command line."""
