"""Redfish SessionService (login: POST Sessions with a principal's name and one of its
API tokens as the password -> `X-Auth-Token`; DELETE to log out; an idle timeout) and
AccountService: the agent's principals as ManagerAccounts, and Redfish's predefined
roles mapped onto the agent's roles (Administrator -> Administrator, Operator ->
VMOperator, ReadOnly -> Auditor). An Administrator (Permissions.Modify) adds an account:
a principal, a grant of the role on /, and a first API token, shown once.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from hvagent.access.policy import AclEntry
from hvagent.access.principal import Principal
from hvagent.access.privileges import ADMINISTRATOR
from hvagent.access.privileges import Privilege as P
from hvagent.access.security import Security
from hvagent.access.sessions import MAX_TIMEOUT, MIN_TIMEOUT
from hvagent.access.tokens import PRINCIPAL_RE
from hvagent.api import deps
from hvagent.api.auth import Requirement, permitted, require
from hvagent.api.redfish.odata import (
    ROOT,
    RedfishError,
    answer,
    check_if_match,
    collection,
    json_body,
    no_content,
    resource,
)

router = APIRouter(tags=["redfish"])
SecurityDep = Annotated[Security, Depends(deps.security)]
SESSIONS = f"{ROOT}/SessionService/Sessions"
SEE_ALL = require(P.SYS_AUDIT, "/")

# Redfish role -> (agent role, Redfish privileges it carries).
ROLES: dict[str, tuple[str, list[str]]] = {
    "Administrator": (ADMINISTRATOR, ["Login", "ConfigureManager", "ConfigureUsers",
                                      "ConfigureSelf", "ConfigureComponents"]),
    "Operator": ("VMOperator", ["Login", "ConfigureSelf", "ConfigureComponents"]),
    "ReadOnly": ("Auditor", ["Login", "ConfigureSelf"]),
}


class OwnSession(Requirement):
    """Sys.Audit on /, or the session the URL names is the caller's own."""

    def permits(self, request: Request, path: str | None) -> bool:
        if super().permits(request, path):
            return True
        security: Security = request.app.state.security
        s = security.sessions.get(request.path_params.get("session_id", ""))
        me: Principal | None = getattr(request.state, "principal", None)
        return s is not None and me is not None and s.principal == me


OWN_SESSION = OwnSession(P.SYS_AUDIT, "/")


def _session_body(s: Any) -> dict[str, Any]:
    return resource(f"{SESSIONS}/{s.id}", "Session", s.id, "User session",
                    UserName=s.principal.name, SessionType="Redfish",
                    CreatedTime=_iso(s.created_at))


def _iso(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


@router.get(f"{ROOT}/SessionService", dependencies=[Depends(SEE_ALL)])
async def session_service(security: SecurityDep) -> Response:
    return answer(_service_body(security))


def _service_body(security: Security) -> dict[str, Any]:
    return resource(f"{ROOT}/SessionService", "SessionService", "SessionService",
                    "Session service", ServiceEnabled=True,
                    SessionTimeout=security.sessions.timeout,
                    Sessions={"@odata.id": SESSIONS},
                    Status={"State": "Enabled", "Health": "OK"})


@router.patch(f"{ROOT}/SessionService", dependencies=[Depends(require(P.SYS_MODIFY, "/"))])
async def patch_session_service(request: Request, security: SecurityDep) -> Response:
    body = await json_body(request, {"SessionTimeout"}, "the SessionService")
    check_if_match(request, _service_body(security))
    if "SessionTimeout" in body:
        t = body["SessionTimeout"]
        if not isinstance(t, int) or isinstance(t, bool) or not MIN_TIMEOUT <= t <= MAX_TIMEOUT:
            raise RedfishError(400, f"SessionTimeout: {t!r} is not {MIN_TIMEOUT}.."
                               f"{MAX_TIMEOUT} seconds", "PropertyValueError",
                               "SessionTimeout")
        security.sessions.set_timeout(t)
    return answer(_service_body(security))


@router.get(SESSIONS, dependencies=[Depends(require(P.VM_AUDIT, "/vms", or_else=SEE_ALL))])
async def list_sessions(request: Request, security: SecurityDep) -> Response:
    me = getattr(request.state, "principal", None)
    everyone = SEE_ALL.permits(request, "/")
    members = [f"{SESSIONS}/{s.id}" for s in security.sessions.list()
               if everyone or s.principal == me]
    return answer(collection(SESSIONS, "SessionCollection", "Sessions", members))


@router.post(SESSIONS)
async def login(request: Request, security: SecurityDep) -> Response:
    """Public (the login): a wrong name or password is a 401 like any other."""
    body = await json_body(request, {"UserName", "Password"}, "a Session")
    user, password = body.get("UserName"), body.get("Password")
    if not isinstance(user, str) or not isinstance(password, str):
        raise RedfishError(400, "UserName and Password (one of the user's API tokens) are "
                           "required", "PropertyMissing" if False else "GeneralError")
    peer = request.client.host if request.client else ""
    made = security.sessions.login(user, password, client=peer)
    if made is None:
        request.state.denial = f"login as {user} refused"
        raise RedfishError(401, "invalid user name or password (an API token of that user)",
                           "NoValidSession")
    session, secret = made
    request.state.principal = session.principal
    request.state.acl_path = f"{SESSIONS}/{session.id}"
    return answer(_session_body(session), 201, {
        "X-Auth-Token": secret, "Location": f"{SESSIONS}/{session.id}"})


@router.get(f"{SESSIONS}/{{session_id}}", dependencies=[Depends(OWN_SESSION)])
async def get_session(session_id: Annotated[str, Path(max_length=32)],
                      security: SecurityDep) -> Response:
    s = security.sessions.get(session_id)
    if s is None:
        raise RedfishError(404, f"{session_id}: no such session", "ResourceNotFound",
                           "Session", session_id)
    return answer(_session_body(s))


@router.delete(f"{SESSIONS}/{{session_id}}", dependencies=[Depends(OWN_SESSION)])
async def logout(session_id: Annotated[str, Path(max_length=32)],
                 security: SecurityDep) -> Response:
    if not security.sessions.logout(session_id):
        raise RedfishError(404, f"{session_id}: no such session", "ResourceNotFound",
                           "Session", session_id)
    return no_content()


# AccountService


ACCOUNTS = f"{ROOT}/AccountService/Accounts"


def _principals(security: Security) -> dict[str, str | None]:
    """principal -> its Redfish role on / (None: a role Redfish has no name for)."""
    out: dict[str, str | None] = {}
    by_agent = {agent: rf for rf, (agent, _) in ROLES.items()}
    for t in security.tokens.list_tokens():
        out.setdefault(t.principal, None)
    for e in [*security.policy.acl, *security.tokens.grants()]:
        if e.path == "/" and e.role in by_agent:
            out[e.principal] = by_agent[e.role]
        else:
            out.setdefault(e.principal, None)
    return out


@router.get(f"{ROOT}/AccountService", dependencies=[Depends(SEE_ALL)])
async def account_service() -> Response:
    return answer(resource(
        f"{ROOT}/AccountService", "AccountService", "AccountService", "Account service",
        ServiceEnabled=True, LocalAccountAuth="Enabled",
        Accounts={"@odata.id": ACCOUNTS}, Roles={"@odata.id": f"{ROOT}/AccountService/Roles"},
        Status={"State": "Enabled", "Health": "OK"}))


@router.get(ACCOUNTS, dependencies=[Depends(SEE_ALL)])
async def accounts(security: SecurityDep) -> Response:
    return answer(collection(ACCOUNTS, "ManagerAccountCollection", "Accounts",
                             [f"{ACCOUNTS}/{p}" for p in sorted(_principals(security))]))


def _account_body(name: str, role: str | None) -> dict[str, Any]:
    body = resource(f"{ACCOUNTS}/{name}", "ManagerAccount", name, f"Account {name}",
                    UserName=name, Enabled=True, Locked=False, AccountTypes=["Redfish"])
    if role is not None:
        body["RoleId"] = role
        body["Links"] = {"Role": {"@odata.id": f"{ROOT}/AccountService/Roles/{role}"}}
    return body


@router.get(f"{ACCOUNTS}/{{account_id}}", dependencies=[Depends(SEE_ALL)])
async def account(account_id: Annotated[str, Path(max_length=64)],
                  security: SecurityDep) -> Response:
    found = _principals(security)
    if account_id not in found:
        raise RedfishError(404, f"{account_id}: no such account", "ResourceNotFound",
                           "ManagerAccount", account_id)
    return answer(_account_body(account_id, found[account_id]))


@router.post(ACCOUNTS, dependencies=[Depends(require(P.PERMISSIONS_MODIFY, "/"))])
async def create_account(request: Request, security: SecurityDep) -> Response:
    body = await json_body(request, {"UserName", "RoleId", "Password", "Enabled"},
                           "a ManagerAccount")
    user, role = body.get("UserName"), body.get("RoleId")
    if not isinstance(user, str) or not PRINCIPAL_RE.match(user):
        raise RedfishError(400, f"UserName: {user!r} is not a valid principal name",
                           "PropertyValueError", "UserName")
    if role not in ROLES:
        raise RedfishError(400, f"RoleId: {role!r} is not one of {', '.join(ROLES)}",
                           "PropertyValueNotInList", str(role), "RoleId")
    if "Password" in body:
        raise RedfishError(400, "Password: an account's password is an API token the agent "
                           "makes; leave Password out (the token is in the answer, once)",
                           "PropertyValueError", "Password")
    if user in _principals(security):
        raise RedfishError(409, f"UserName: {user} exists already", "ResourceInUse")
    security.tokens.grant(AclEntry(path="/", principal=user, role=ROLES[role][0]),
                          security.policy)
    info, token = security.tokens.create(user, None, comment="Redfish account")
    out = _account_body(user, role)
    out["Oem"] = {"Hvagent": {"Token": token, "TokenId": info.id}}
    return answer(out, 201, {"Location": f"{ACCOUNTS}/{user}"})


@router.get(f"{ROOT}/AccountService/Roles", dependencies=[Depends(SEE_ALL)])
async def roles() -> Response:
    return answer(collection(f"{ROOT}/AccountService/Roles", "RoleCollection", "Roles",
                             [f"{ROOT}/AccountService/Roles/{r}" for r in ROLES]))


@router.get(f"{ROOT}/AccountService/Roles/{{role_id}}", dependencies=[Depends(SEE_ALL)])
async def role(role_id: Annotated[str, Path(max_length=32)], request: Request) -> Response:
    if role_id not in ROLES:
        raise RedfishError(404, f"{role_id}: no such role", "ResourceNotFound", "Role",
                           role_id)
    agent_role, privileges = ROLES[role_id]
    r = request.app.state.security.policy.role(agent_role)
    return answer(resource(
        f"{ROOT}/AccountService/Roles/{role_id}", "Role", role_id, f"{role_id} role",
        RoleId=role_id, IsPredefined=True, AssignedPrivileges=privileges,
        OemPrivileges=sorted(r.privileges) if r else [],
        Description=f"the agent's {agent_role} role on /"))


__all__ = ["permitted", "router"]
