"""Access: who may do what. Nothing here knows HTTP (hvagent.api.auth is its HTTP side).

- privileges.py  the privilege table: every privilege and the built-in roles
- principal.py   who sends a request, and the principal of the running one
- acl.py         ACL entries and the decision (inheritance, VM ownership)
- policy.py      the host policy file and the admission checks (quotas, formats, VLANs)
- tokens.py      API tokens, stored grants and VM owners
- audit.py       the audit log
- security.py    one agent's access control: a token's principal, a privilege on a path,
                 quota usage, the audit log
"""
