"""Access: who may do what. Principals, the privilege table, roles, ACLs, tokens, the
host policy and the audit log. Nothing here knows HTTP."""
