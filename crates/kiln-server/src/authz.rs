//! Who may do what, decided in one place.
//!
//! Every API key belongs to a team. A team's keys see and change only what the team
//! owns; anything else answers 404, exactly as if it did not exist, so a stranger
//! cannot even learn that a sandbox id or template name is in use. Built-in templates
//! belong to no team: every team may start sandboxes from them, only admins change
//! them. Admin keys (the operator's) manage teams and keys and see everything.
//!
//! Each endpoint declares its [`crate::endpoint::Access`] where it is routed
//! ([`crate::routes::endpoints`]); the router applies the matching middleware
//! (`app.rs`), so no handler can forget it, and a test walks the same list to attack
//! every route.

/// The authenticated caller, put in the request by [`authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub key_id: i64,
    pub team_id: i64,
    pub admin: bool,
}

impl Caller {
    /// The server acting on its own behalf (deadlines, shutdown, recovery).
    pub const OPERATOR: Caller = Caller {
        key_id: 0,
        team_id: 0,
        admin: true,
    };

    /// Whether a resource of `team_id` exists for this caller.
    pub fn sees(&self, team_id: i64) -> bool {
        self.admin || self.team_id == team_id
    }

    /// Whether this caller may start sandboxes from (and read) a template owned by
    /// `owner` (`None`: a built-in, everyone's).
    pub fn sees_template(&self, owner: Option<i64>) -> bool {
        owner.is_none_or(|team| self.sees(team))
    }

    /// Whether this caller may rebuild, tag or delete a template owned by `owner`.
    pub fn may_change_template(&self, owner: Option<i64>) -> bool {
        match owner {
            None => self.admin,
            Some(team) => self.sees(team),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_see_their_team_admins_see_all() {
        let member = Caller {
            key_id: 5,
            team_id: 2,
            admin: false,
        };
        assert!(member.sees(2));
        assert!(!member.sees(3));
        assert!(Caller::OPERATOR.sees(3));
        assert!(member.sees_template(None));
        assert!(member.sees_template(Some(2)));
        assert!(!member.sees_template(Some(3)));
        assert!(!member.may_change_template(None));
        assert!(member.may_change_template(Some(2)));
        assert!(!member.may_change_template(Some(3)));
        assert!(Caller::OPERATOR.may_change_template(None));
    }
}
