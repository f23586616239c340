//! Users, their sign-in identities and their groups: the rows [`load_actor`] turns
//! into an [`Actor`], and who is in which group (whom to tell about a request).
//!
//! Never decides what a user may do: that is `policy`, from the `Actor` loaded here.

use std::collections::BTreeSet;

use sqlx::{Row, Sqlite};

use super::{Conn, Db, new_id};
use crate::error::Result;
use crate::policy::Actor;

/// Creates the user if new (keyed by issuer and subject), refreshes their email and
/// name, and returns their id. Fails with a conflict if the email already belongs to
/// another identity.
pub async fn upsert_identity(
    conn: &mut Conn,
    issuer: &str,
    subject: &str,
    email: &str,
    display_name: &str,
    now: i64,
) -> Result<String> {
    let res = sqlx::query_scalar(
        "INSERT INTO users (id, email, display_name, created_at, issuer, subject) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (issuer, subject) DO UPDATE
           SET email = excluded.email, display_name = excluded.display_name
         RETURNING id",
    )
    .bind(new_id())
    .bind(email)
    .bind(display_name)
    .bind(now)
    .bind(issuer)
    .bind(subject)
    .fetch_one(&mut *conn)
    .await;
    match res {
        Ok(id) => Ok(id),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(crate::Error::conflict(
            format!("{email} already belongs to another account; ask an admin"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A demo user: issuer `dev`, subject = email.
pub async fn upsert_user(
    conn: &mut Conn,
    email: &str,
    display_name: &str,
    now: i64,
) -> Result<String> {
    upsert_identity(conn, "dev", email, email, display_name, now).await
}

/// Refuses every session of this user that signed in before `now`.
pub async fn force_reauth(conn: &mut Conn, user_id: &str, now: i64) -> Result<bool> {
    let done = sqlx::query("UPDATE users SET sessions_valid_after = ? WHERE id = ?")
        .bind(now)
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Users with their groups and when those were last synced, for the admin page.
pub async fn list_users(db: &Db) -> Result<Vec<UserRow>> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.email, u.display_name, u.issuer, u.subject,
                COALESCE((SELECT group_concat(group_name, ', ') FROM
                          (SELECT group_name FROM user_groups g WHERE g.user_id = u.id ORDER BY group_name)), '') AS groups,
                (SELECT MAX(synced_at) FROM user_groups g WHERE g.user_id = u.id) AS synced_at,
                u.sessions_valid_after
         FROM users u ORDER BY u.email",
    )
    .fetch_all(db)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub issuer: String,
    pub subject: String,
    pub groups: String,
    pub synced_at: Option<i64>,
    pub sessions_valid_after: i64,
}

/// Replaces a user's group membership.
pub async fn set_user_groups(
    conn: &mut Conn,
    user_id: &str,
    groups: &[String],
    now: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM user_groups WHERE user_id = ?")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    for g in groups.iter().collect::<BTreeSet<_>>() {
        sqlx::query("INSERT INTO user_groups (user_id, group_name, synced_at) VALUES (?, ?, ?)")
            .bind(user_id)
            .bind(g)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A user with their current groups, or `None` if there is no such user.
pub async fn load_actor(
    conn: &mut Conn,
    user_id: &str,
    admin_groups: &[String],
) -> Result<Option<Actor>> {
    let Some(row) = sqlx::query(
        "SELECT id, email, display_name, issuer, subject, sessions_valid_after FROM users WHERE id = ?",
    )
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let groups: BTreeSet<String> =
        sqlx::query_scalar("SELECT group_name FROM user_groups WHERE user_id = ?")
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    let is_admin = admin_groups.iter().any(|g| groups.contains(g));
    let groups_synced_at: Option<i64> =
        sqlx::query_scalar("SELECT MAX(synced_at) FROM user_groups WHERE user_id = ?")
            .bind(user_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(Some(Actor {
        user_id: row.get("id"),
        email: row.get("email"),
        display_name: row.get("display_name"),
        issuer: row.get("issuer"),
        subject: row.get("subject"),
        sessions_valid_after: row.get("sessions_valid_after"),
        groups_synced_at,
        groups,
        is_admin,
    }))
}

pub async fn user_id_by_email(conn: &mut Conn, email: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM users WHERE email = ?")
        .bind(email)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Users in any of these groups, except `except`: the people to tell about a request.
pub async fn users_in_groups(
    conn: &mut Conn,
    groups: &[String],
    except: &str,
) -> Result<Vec<(String, String)>> {
    let mut q = sqlx::QueryBuilder::<Sqlite>::new(
        "SELECT DISTINCT u.id, u.email FROM users u JOIN user_groups g ON g.user_id = u.id WHERE u.id != ",
    );
    q.push_bind(except.to_string())
        .push(" AND g.group_name IN (");
    let mut sep = q.separated(", ");
    for g in groups {
        sep.push_bind(g.clone());
    }
    q.push(") ORDER BY u.email");
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    Ok(q.build_query_as().fetch_all(&mut *conn).await?)
}
