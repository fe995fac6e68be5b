"""The specd wire API's Python stubs: the leaf that the server (``deploy/``) and the client library and CLI
(``specd/``) share. Generated, importing nothing of the project; see ``specd_api/v1``.

Not ``specd.v1`` (then ``deploy`` would import the CLI package, and the CLI imports ``deploy``), and never a
package named ``proto`` (``proto-plus`` owns that name). The wire names do not change with the Python home:
the .proto's ``package specd.v1`` keeps every message ``specd.v1.*`` and the service ``/specd.v1.Specd``.
"""
