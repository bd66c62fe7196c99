"""The report: a view-model computed once (``summary``), figures, jinja2 templates for Markdown and HTML
(``render``), and the Hub dataset card (``card``). Nothing here reads the store: the stages do."""
