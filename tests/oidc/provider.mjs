// A real OpenID Connect provider (npm oidc-provider, OpenID-certified) for twokey's
// tests. Configured by one JSON argument:
//   { "port": 1234, "clients": [ {client_id, client_secret, redirect_uris} ],
//     "accounts": { "alice": { "email": "...", "email_verified": true, "name": "...",
//                              "groups": ["..."] } },
//     "id_token_ttl": 3600 }
// Sign-in uses the provider's own development interactions: any login name with any
// password becomes that account. Prints "ready <issuer>" once it listens on 127.0.0.1.
import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[2]);
const issuer = `http://127.0.0.1:${config.port}`;

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  async findAccount(ctx, sub) {
    const account = config.accounts[sub] ?? { email: `${sub}@unknown.example`, groups: [] };
    return {
      accountId: sub,
      async claims() {
        return { sub, ...account };
      },
    };
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  ttl: {
    IdToken: config.id_token_ttl ?? 3600,
    AccessToken: 600,
    AuthorizationCode: 60,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  cookies: { keys: ['twokey-test-cookie-key-0123456789abcdef'] },
  // Loopback only: no TLS to terminate.
  clientBasedCORS: () => false,
});

// Test control: POST /__test/accounts/<login> {"groups": [...]} changes what the
// provider says about that account from the next sign-in on, as an IdP admin would.
provider.use(async (ctx, next) => {
  const prefix = '/__test/accounts/';
  if (ctx.method === 'POST' && ctx.path.startsWith(prefix)) {
    const login = decodeURIComponent(ctx.path.slice(prefix.length));
    let body = '';
    for await (const chunk of ctx.req) body += chunk;
    config.accounts[login] = { ...(config.accounts[login] ?? {}), ...JSON.parse(body) };
    ctx.status = 204;
    return;
  }
  await next();
});

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
